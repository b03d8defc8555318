#!/usr/bin/env bash
# Every GPU table of issue 5 for one model config, within one device call (10 minutes at most):
#   bash benchmarks/gpu_suite.sh sd15      # then: bash benchmarks/gpu_suite.sh sdxl
# The GPU machine has torch, transformers, accelerate, peft and safetensors but not diffusers: carry its wheel
# (and any other missing one) in .whl/ as the device tool's README describes; they are installed first.
set -u
config="${1:-sd15}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" || exit 1
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" SVDIFF_TOOLS_CACHE="$(mktemp -d)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
date -u
timeout 300 python3 benchmarks/train_step.py --config "$config" --device cuda --plot "${OUT:-.}/train_step_${config}_cuda.png"
timeout 200 python3 benchmarks/svd_init.py --config "$config" --device cuda
if [ "$config" = sd15 ]; then timeout 60 python3 benchmarks/inference.py --device cuda; fi
