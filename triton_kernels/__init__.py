"""Triton kernels of aefast and their launch functions: no autograd, no policy.

Installed as aefast.triton_kernels. Set TRITON_INTERPRET=1 before importing to run
the kernels on CPU tensors (how the CPU test suite checks them).
"""
