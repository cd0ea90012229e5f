#!/usr/bin/env bash
# The CUDA checks, as one script for a lent GPU machine (its own python3 and torch; nothing can be installed there).
# Missing pure-Python packages and bitsandbytes travel in .gpu/site (ignored by git; carry it), made here with:
#   SP=$(python3 -c 'import site; print(site.getsitepackages()[0])'); mkdir -p .gpu/site
#   for p in bitsandbytes gguf prompt_toolkit wcwidth; do cp -r $SP/$p $SP/$p-*.dist-info .gpu/site/; done
#   ls .gpu/site/bitsandbytes/lib*.so | grep -v -e _cpu -e cuda130 | xargs rm   # the image's torch is cu130
# Logs and JSON go to $OUT (default ./gpu-out).
# STAGES picks the stages, run in this order (default "tests nf4 speed gguf cli"; the suite needs a call of its own:
# ~4 minutes there). Each prints its wall time.
#   tests  the GPU tests (offloading, CUDA graphs, bitsandbytes and GGUF on CUDA against the CPU paths); GPU_TESTS
#          adds test files
#   nf4    cuda_speed.py with bitsandbytes nf4 linears: the q4 model of the 8/4/2 GiB budgets and of the 50% target,
#          so it runs right after the tests; NF4_ARGS, NF4_TIMEOUT (seconds, default 240)
#   speed  bench/cuda_speed.py (Nano-shaped bf16 decode/prefill, resident and offloaded under VRAM budgets); SPEED_ARGS
#          (default: offloaded rows from CUDA graphs only; eager offloaded decode was measured before)
#   gguf   a Nano-shaped Q4_K_M GGUF written by our codecs, dequantized onto the GPU: cuda_speed.py --format gguf and
#          `marco bench FILE --device cuda`
#   gguf-q the same GGUF with its experts kept quantized (gguf_experts.py): resident and under the budgets; GGUFQ_ARGS
#   gguf-bench  `marco bench` on that GGUF: resident, and with 50% of the experts resident, misses read in place
#          (auto) and copied (`--expert-misses copy`) (llama.cpp's numbers for
#          that file come from bench/llamacpp_cuda.sh). gguf-q and gguf-bench write the file in the background
#          from the start (~70 s of one core)
#   cli    `marco run` and `marco bench` on the demo model (device "auto" = CUDA there)
#   suite  the whole test suite with a CUDA device visible; SUITE_TIMEOUT (seconds, default 420)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
STAGES=${STAGES:-tests nf4 speed gguf cli}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.gpu/site" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python3 -c "import sys, torch, transformers, bitsandbytes, gguf, typer; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, transformers.__version__, bitsandbytes.__version__, typer.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1  # the direct reads' kernels
  nproc
  command -v cc gcc nvcc || true
  ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null || echo "no CUDA toolkit (nvcc) under /usr/local"
} 2>&1 | tee "$OUT/env.log"
stage() { echo "== $1 (at ${SECONDS}s)"; }
GGUF=/tmp/nano-q4_k_m.gguf
if [[ ( " $STAGES " == *" gguf-bench "* || " $STAGES " == *" gguf-q "* ) && ! -f $GGUF ]]; then  # ~70 s, one core
  python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
from bench_vs_llamacpp import write_marco_gguf; write_marco_gguf(Path('$GGUF'), mix='q4_k_m')" > "$OUT/gguf_write.log" 2>&1 &
  writer=$!
fi
wait_gguf() { [[ -n ${writer:-} ]] && { wait "$writer"; echo "writer rc $?"; writer=; }; }
if [[ " $STAGES " == *" tests "* ]]; then
  stage "gpu tests"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_offload_gpu.py \
    tests/test_quantize_bnb.py tests/test_cuda_graphs.py tests/test_gguf_types.py tests/test_gguf_runtime.py \
    tests/test_gpu_fit.py ${GPU_TESTS:-} 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ " $STAGES " == *" nf4 "* ]]; then
  stage "cuda_speed --format nf4"
  timeout "${NF4_TIMEOUT:-240}" python3 bench/cuda_speed.py --format nf4 --json "$OUT/cuda_speed_nf4.json" ${NF4_ARGS:---modes graphs} \
    2>&1 | tee "$OUT/cuda_speed_nf4.log" | tail -25
fi
if [[ " $STAGES " == *" speed "* ]]; then
  stage "cuda_speed"
  timeout 240 python3 bench/cuda_speed.py --json "$OUT/cuda_speed.json" ${SPEED_ARGS:---modes graphs} 2>&1 \
    | tee "$OUT/cuda_speed.log" | tail -25
fi
if [[ " $STAGES " == *" gguf "* ]]; then
  stage "cuda_speed --format gguf"
  wait_gguf
  timeout 150 python3 bench/cuda_speed.py --format gguf --gguf $GGUF --json "$OUT/cuda_speed_gguf.json" \
    2>&1 | tee "$OUT/cuda_speed_gguf.log" | tail -8
  stage "marco bench GGUF --device cuda"
  timeout 90 python3 -m marco_local bench $GGUF --device cuda --json 2>&1 | tee -a "$OUT/cuda_speed_gguf.log" \
    | tail -3
fi
if [[ " $STAGES " == *" gguf-q "* ]]; then
  stage "cuda_speed --format gguf --gguf-experts quantized (resident, then offloaded); GGUFQ_ARGS"
  wait_gguf
  timeout 300 python3 bench/cuda_speed.py --format gguf --gguf $GGUF --gguf-experts quantized \
    --json "$OUT/cuda_speed_gguf_q.json" ${GGUFQ_ARGS:---modes graphs --no-cpu-misses --no-prefetch} 2>&1 \
    | tee "$OUT/cuda_speed_gguf_q.log" | tail -16
fi
if [[ " $STAGES " == *" gguf-bench "* ]]; then
  stage "marco bench GGUF --device cuda (the file bench/llamacpp_cuda.sh measures llama.cpp on)"
  wait_gguf
  timeout 90 python3 -m marco_local bench $GGUF --device cuda -r 3 --json 2>&1 | tee "$OUT/marco_gguf.log" | tail -3
  stage "marco bench GGUF --device cuda --experts-resident 50% (misses read in place: auto; against llama.cpp's --n-cpu-moe 14)"
  timeout 120 python3 -m marco_local bench $GGUF --device cuda -r 3 --experts-resident 50% --json 2>&1 \
    | tee -a "$OUT/marco_gguf.log" | tail -3
  stage "marco bench GGUF --device cuda --experts-resident 50% --expert-misses copy"
  timeout 120 python3 -m marco_local bench $GGUF --device cuda -r 3 --experts-resident 50% --expert-misses copy \
    --json 2>&1 | tee -a "$OUT/marco_gguf.log" | tail -3
fi
if [[ " $STAGES " == *" cli "* ]]; then
  stage "marco run / marco bench on CUDA (the demo model)"
  echo "Hello, how are you?" | timeout 90 python3 -m marco_local run demo -n 24 --temperature 0 --verbose 2>&1 \
    | tee "$OUT/cli.log" | tail -8
  timeout 90 python3 -m marco_local bench demo --json 2>&1 | tee -a "$OUT/cli.log" | tail -3
fi
if [[ " $STAGES " == *" suite "* ]]; then
  stage "full suite"
  timeout "${SUITE_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider --tb=short --maxfail=30 -rf \
    -m "not slow and not gpu" 2>&1 | tee "$OUT/suite.log" | tail -40
fi
stage "done"
