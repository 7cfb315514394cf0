#!/usr/bin/env bash
# Create benchmarks/.venv-llmc with llm-compressor 0.14 for `bench.py --llmcompressor-python`.
#
# llm-compressor 0.14 pins compressed-tensors==0.19 and transformers<=5.17, so it cannot share
# ptqflow's venv (compressed-tensors 0.20). Usage: bash benchmarks/setup_llmcompressor.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-llmc"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.13.0 llmcompressor==0.14.0.1 psutil
"$venv/bin/python" -c "import llmcompressor, compressed_tensors; print('llmcompressor', \
llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__)"
echo "use: python benchmarks/bench.py --llmcompressor-python $venv/bin/python"
