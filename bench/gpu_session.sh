#!/usr/bin/env bash
# One device call for the GPU acceptance points of issues 11, 15 and 13 (memory, serving, observe),
# each bounded so one slow bench cannot starve the others. Outputs land in $OUT (or /tmp/gpu_out).
# Usage on the GPU node, from the repo root, after installing the .whl wheels:  bash bench/gpu_session.sh
set -u
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$out/$name.md" 2> "$out/$name.log"
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$out/gpu.txt"
}
run memory "${MEMORY_S:-320}" python3 bench/bench_memory.py --steps 4 --out "$out/memory.jsonl"
run serve "${SERVE_S:-110}" python3 bench/bench_serve.py --quick
run observe "${OBSERVE_S:-110}" python3 bench/bench_observe.py --quick --out "$out/observe.json"
for f in memory serve observe; do echo "### $f"; cat "$out/$f.md"; tail -5 "$out/$f.log"; done
