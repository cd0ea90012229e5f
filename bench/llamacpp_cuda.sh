#!/usr/bin/env bash
# llama.cpp with CUDA against our runtime on one GPU machine, same Nano-shaped Q4_K_M GGUF, same run: fully resident,
# and with half the experts kept off the GPU (llama.cpp's --n-cpu-moe 14 of 28 layers; ours --experts-resident 50%).
# The machine has nvcc, cmake and ninja but no network, so llama.cpp's source travels in .gpu/llama.cpp (ignored by
# git; carry .gpu): the copy vendored in llama-cpp-python's source package, pruned to what llama-bench needs:
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36; tar xzf llama_cpp_python-0.3.36.tar.gz
#   cd llama_cpp_python-0.3.36/vendor/llama.cpp; cp -r CMakeLists.txt cmake common src include ggml vendor tools \
#     LICENSE DEST/; then in DEST: remove the other ggml backends, and keep only llama-bench in tools/CMakeLists.txt
# FlashAttention kernels are not compiled (GGML_CUDA_FA=OFF, llama-bench -fa 0) to fit the build into the device
# time; at these context lengths attention is a small share of decode. Logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.gpu/site:$PWD/bench" PYTHONUNBUFFERED=1
GGUF=/tmp/nano-q4_k_m.gguf
stage() { echo "== $1 (at ${SECONDS}s)"; }
stage "writing $GGUF in the background"
python3 -c "from pathlib import Path; from bench_vs_llamacpp import write_marco_gguf; \
write_marco_gguf(Path('$GGUF'), mix='q4_k_m')" > "$OUT/gguf_write.log" 2>&1 &
writer=$!
stage "building llama-bench with CUDA"
cmake -S .gpu/llama.cpp -B /tmp/llb -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$OUT/cmake.log" 2>&1 \
  || tail -20 "$OUT/cmake.log"
timeout "${BUILD_TIMEOUT:-330}" ninja -C /tmp/llb -j 18 llama-bench > "$OUT/build.log" 2>&1
echo "build rc $? ($(grep -c '^\[' "$OUT/build.log") steps logged)"; tail -3 "$OUT/build.log"
wait "$writer"; echo "writer rc $?"; ls -l "$GGUF"
LB=/tmp/llb/bin/llama-bench
if [[ -x $LB ]]; then
  stage "llama-bench, fully resident"
  timeout 90 $LB -m "$GGUF" -ngl 99 -fa 0 -p 512 -n 128 -r 3 -o json > "$OUT/llama_resident.json" 2> "$OUT/llama.log"
  echo "rc $?"; python3 -c "import json; [print(r['n_prompt'], r['n_gen'], round(r['avg_ts'], 1)) \
for r in json.load(open('$OUT/llama_resident.json'))]"
  stage "llama-bench, experts of 14 of 28 layers on the CPU"
  timeout 90 $LB -m "$GGUF" -ngl 99 -ncmoe 14 -t 16 -fa 0 -p 512 -n 128 -r 3 -o json > "$OUT/llama_ncmoe14.json" \
    2>> "$OUT/llama.log"
  echo "rc $?"; python3 -c "import json; [print(r['n_prompt'], r['n_gen'], round(r['avg_ts'], 1)) \
for r in json.load(open('$OUT/llama_ncmoe14.json'))]"
fi
stage "marco bench, fully resident"
timeout 100 python3 -m marco_local bench "$GGUF" --device cuda -r 3 --json > "$OUT/marco_resident.json" 2> "$OUT/marco.log"
echo "rc $?"; cat "$OUT/marco_resident.json"
stage "marco bench, 50% of experts resident"
timeout 100 python3 -m marco_local bench "$GGUF" --device cuda -r 3 --experts-resident 50% --json \
  > "$OUT/marco_50pct.json" 2>> "$OUT/marco.log"
echo "rc $?"; cat "$OUT/marco_50pct.json"
stage "done"
