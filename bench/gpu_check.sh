#!/usr/bin/env bash
# The CUDA checks, as one script for a lent GPU machine (its own python3 and torch; nothing can be installed there).
# Missing pure-Python packages and bitsandbytes travel in .gpu/site (ignored by git; carry it), made here with:
#   SP=$(python3 -c 'import site; print(site.getsitepackages()[0])'); mkdir -p .gpu/site
#   for p in bitsandbytes gguf prompt_toolkit wcwidth; do cp -r $SP/$p $SP/$p-*.dist-info .gpu/site/; done
#   ls .gpu/site/bitsandbytes/lib*.so | grep -v -e _cpu -e cuda130 | xargs rm   # the image's torch is cu130
# Logs and JSON go to $OUT (default ./gpu-out).
# STAGES picks the stages (default "tests speed cli"; the suite needs a call of its own: ~4 minutes there):
#   tests  the GPU tests (offloading, CUDA graphs, bitsandbytes and GGUF on CUDA against the CPU paths)
#   speed  bench/cuda_speed.py (Nano-shaped bf16 decode/prefill, resident and offloaded under VRAM budgets); SPEED_ARGS
#   nf4    the same with bitsandbytes nf4 linears (the q4 model of the 8/4/2 GiB budgets)
#   cli    `marco run` and `marco bench` on the demo model (device "auto" = CUDA there)
#   suite  the whole test suite with a CUDA device visible; SUITE_TIMEOUT (seconds, default 420)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
STAGES=${STAGES:-tests speed cli}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.gpu/site" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python3 -c "import sys, torch, transformers, bitsandbytes, gguf, typer; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, transformers.__version__, bitsandbytes.__version__, typer.__version__)"
  nproc
  command -v cc gcc
} 2>&1 | tee "$OUT/env.log"
if [[ " $STAGES " == *" tests "* ]]; then
  echo "== gpu tests"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_offload_gpu.py \
    tests/test_quantize_bnb.py tests/test_cuda_graphs.py tests/test_gguf_types.py tests/test_gguf_runtime.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ " $STAGES " == *" speed "* ]]; then
  echo "== cuda_speed"
  timeout 280 python3 bench/cuda_speed.py --json "$OUT/cuda_speed.json" ${SPEED_ARGS:---no-extra} 2>&1 \
    | tee "$OUT/cuda_speed.log" | tail -25
fi
if [[ " $STAGES " == *" nf4 "* ]]; then
  echo "== cuda_speed --format nf4"
  timeout 280 python3 bench/cuda_speed.py --format nf4 --no-extra --json "$OUT/cuda_speed_nf4.json" 2>&1 \
    | tee "$OUT/cuda_speed_nf4.log" | tail -25
fi
if [[ " $STAGES " == *" cli "* ]]; then
  echo "== marco run / marco bench on CUDA (the demo model)"
  echo "Hello, how are you?" | timeout 90 python3 -m marco_local run demo -n 24 --temperature 0 --verbose 2>&1 \
    | tee "$OUT/cli.log" | tail -8
  timeout 90 python3 -m marco_local bench demo --json 2>&1 | tee -a "$OUT/cli.log" | tail -3
fi
if [[ " $STAGES " == *" suite "* ]]; then
  echo "== full suite"
  timeout "${SUITE_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider --tb=short --maxfail=30 -rf \
    -m "not slow and not gpu" 2>&1 | tee "$OUT/suite.log" | tail -40
fi
