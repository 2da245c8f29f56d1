#!/usr/bin/env bash
# Downloads the peer of bench/sae_peer.py (EleutherAI's sparsify) and the packages it imports
# that the GPU machines' image lacks, as Python 3.12 wheels, into .whl/ (git-ignored), for a
# machine with no network. Then, with the device tool (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site; bash bench/gpu_suite.sh --out "$OUT/gpu"
# (the image has torch, transformers, accelerate, einops, safetensors, pyarrow, pandas).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  eai-sparsify==1.3.3 natsort simple-parsing docstring-parser schedulefree datasets dill multiprocess
ls .whl
