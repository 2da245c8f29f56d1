"""Two shortcuts in Triton's interpreter, so that CI can afford tl.topk.

Triton 3.6's interpreter, in pure Python, is slow in two places that tl.topk's
bitonic network (aefast's packed-key top-k) hits at every compare-exchange:
- every call of a @triton.jit helper (tl.sum, xor_sum, the network's stages)
  re-patches triton.language, listing each module's members with
  inspect.getmembers (~0.2 ms a call, hundreds of calls a program);
- a reduction whose combine function it does not know (xor_sum's) runs one
  element at a time in Python.
One program of the top-k over 256 keys took ~100 ms. Here the members to patch are
listed once (those that are Triton builtins before any kernel ran; each call still
patches exactly the ones that are builtins at that moment, as Triton does), and
xor_sum reduces with numpy's bitwise_xor (xor is associative and commutative: the
same bits). The kernels run unchanged; only the interpreter of the test process is
touched, and where Triton's internals differ from 3.6's nothing is patched (the tests
are then only slower).
"""

import inspect

import numpy as np


def speed_up_interpreter() -> bool:
    """Install both shortcuts. True if installed (or already), False if this Triton's
    interpreter is not laid out as 3.6's."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        xor_combine = tl.standard._xor_combine
        is_builtin = tl.core.is_builtin
        reduce_generic = interpreter.ReduceOps.apply_impl
        patch_builtin = interpreter._patch_builtin
        patch_attr = interpreter._patch_attr
    except (ImportError, AttributeError):
        return False
    if getattr(patch_builtin, "aefast_cached", False):
        return True

    builtin_names = {
        id(pkg): [name for name, member in inspect.getmembers(pkg) if is_builtin(member)]
        for pkg in (tl, tl.core, tl.core.tensor, tl.math, tl.core.tensor_descriptor_base)
    }

    def patch_listed_builtins(pkg, builder, scope):
        names = builtin_names.get(id(pkg))
        if names is None:
            return patch_builtin(pkg, builder, scope)
        for name in names:
            member = getattr(pkg, name)
            if is_builtin(member):
                patch_attr(pkg, name, member, builder, scope)

    def reduce_xor_by_numpy(self, input):
        if self.combine_fn is not xor_combine:
            return reduce_generic(self, input)
        data = input[0].handle.data
        reduced = np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims)
        return self.to_tensor(reduced, input[0].dtype)

    patch_listed_builtins.aefast_cached = True
    interpreter._patch_builtin = patch_listed_builtins
    interpreter.ReduceOps.apply_impl = reduce_xor_by_numpy
    return True
