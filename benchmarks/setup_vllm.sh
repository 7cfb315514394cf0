#!/usr/bin/env bash
# Create benchmarks/.venv-vllm with vLLM 0.33 for the `vllm` test tier (tests/test_vllm.py).
#
# vLLM 0.33 pins torch 2.14 and compressed-tensors 0.17, so it cannot share ptqflow's venv. It is
# about 9.4 GB; the CUDA wheel imports and loads checkpoints on a machine without a GPU
# (benchmarks/vllm_load.py). Usage: bash benchmarks/setup_vllm.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-vllm"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet vllm==0.33.0
"$venv/bin/python" -c "import vllm, compressed_tensors, torch; print('vllm', vllm.__version__, \
'compressed-tensors', compressed_tensors.__version__, 'torch', torch.__version__)"
