#!/usr/bin/env bash
# Bounded device calls for GPU acceptance points: each named part runs with its own timeout, so one slow
# bench cannot starve the rest. Outputs land in $OUT (or /tmp/gpu_out), archived at the end as all.tgz
# (the device tool brings back at most 8 files).
# Usage on the GPU node, from the repo root, after installing the .whl wheels:
#   bash bench/gpu_open_issues.sh fsdp hooks      # FSDP speed/memory/GPU tests, comm-hook variants (~8 min)
#   bash bench/gpu_open_issues.sh heldout heldout2 peaks   # held-out memory tables, allocator peaks (~9 min)
#   bash bench/gpu_open_issues.sh memory serve observe     # issues 11, 15, 13 (was bench/gpu_session.sh)
set -u
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$out/gpu.txt"
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$out/$name.md" 2> "$out/$name.log"
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$out/gpu.txt"
  cat "$out/$name.md"; tail -4 "$out/$name.log"
}
for part in "$@"; do
  case $part in
    fsdp)
      step fsdp_speed 260 python3 bench/bench_speed.py --steps 40 \
        --cases launcher_compiled,launcher_fsdp_compiled,launcher_eager,launcher_fsdp_eager
      step fsdp_memory 150 python3 bench/bench_memory.py --steps 4 --jobs 4 \
        --only b_bf16_mb16,b_bf16_mb16_fsdp,b_bf16_mb16_ac_fsdp,b_fp32_mb8_fsdp_zero2_accum2
      step gpu_tests 120 python3 -m pytest -q -x tests/gpu ;;
    fsdp_memory)  # the sharded estimate (allocator replay) against the GPU
      step fsdp_memory 150 python3 bench/bench_memory.py --steps 4 --jobs 4 \
        --only b_bf16_mb16,b_bf16_mb16_fsdp,b_bf16_mb16_ac_fsdp,b_fp32_mb8_fsdp_zero2_accum2 ;;
    fsdp_compiled)  # the compiled pair alone (BodyThenCompiledTail)
      step fsdp_compiled 130 python3 bench/bench_speed.py --steps 40 --cases launcher_compiled,launcher_fsdp_compiled ;;
    fsdp_repeat)  # DDP and FSDP, eager and compiled, three interleaved rounds (eager varied 0.92-0.97 between calls)
      step fsdp_repeat 420 python3 bench/bench_speed.py --steps 40 --repeat 3 \
        --cases launcher_eager,launcher_fsdp_eager,launcher_compiled,launcher_fsdp_compiled ;;
    heldout2_compile_ac)
      step heldout2_compile_ac 90 python3 bench/bench_memory.py --suite heldout2 --only gpt_d1024_compile_ac_mb8 --steps 4 ;;
    fsdp_probe | fsdp_probe_min)  # where one-rank FSDP's step time goes: phases and top ops, against DDP
      variants=("ddp:parallel=ddp" "fsdp:parallel=fsdp")
      [ "$part" = fsdp_probe ] && variants+=("fsdp_noreshard:parallel=fsdp parallel.reshard_after_forward=false")
      for v in "${variants[@]}"; do
        name=${v%%:*}; rm -rf /tmp/probe_$name
        step probe_$name 90 python3 -m launcher experiment=gpt2_small recipe.data.max_bytes=4000000 ${v#*:} \
          train.steps=20 train.log_every=1 train.compile=false train.eval_every=0 checkpoint.every=0 logger.progress_bar=false \
          profile.enabled=true profile.wait=14 profile.warmup=2 profile.active=3 run.dir=/tmp/probe_$name
        python3 - "$name" <<'PY' | tee -a "$out/phases.txt"
import json, statistics, sys
name = sys.argv[1]
lines = [json.loads(l) for l in open(f"/tmp/probe_{name}/metrics.jsonl") if '"loss"' in l]
keys = [k for k in lines[-1] if k.startswith("time_") or k == "step_time_s"]
print(name, {k: round(statistics.median(l[k] for l in lines[5:14] if k in l) * 1e3, 2) for k in keys}, "ms")
PY
        cp /tmp/probe_$name/profile/key_averages_rank0_*.txt "$out/ops_$name.txt" 2>/dev/null
        head -45 "$out/ops_$name.txt" 2>/dev/null | cut -c1-190
      done ;;
    fsdp_probe_compiled)  # compiled DDP and FSDP: profiler traces (gzipped) for the GPU's idle gaps
      for v in "ddp:parallel=ddp" "fsdp:parallel=fsdp"; do
        name=${v%%:*}; rm -rf /tmp/probec_$name
        step probec_$name 120 python3 -m launcher experiment=gpt2_small recipe.data.max_bytes=4000000 ${v#*:} \
          train.steps=24 train.log_every=1 train.compile=true train.eval_every=0 checkpoint.every=0 \
          logger.progress_bar=false profile.enabled=true profile.wait=18 profile.warmup=2 profile.active=2 profile.row_limit=40 \
          run.dir=/tmp/probec_$name
        for f in /tmp/probec_$name/profile/*; do gzip -c "$f" > "$out/c_${name}_$(basename "$f").gz"; done
        grep -h '"loss"' /tmp/probec_$name/metrics.jsonl | tail -3 | cut -c1-400
      done ;;
    reserved)  # where reserved memory grows on the GPU and in the estimator's replay (conv net, checkpointed)
      step reserved_snap 120 python3 bench/bench_memory.py --suite heldout --steps 4 \
        --only conv_fp32_sgd_ac_mb64 --snapshot conv_fp32_sgd_ac_mb64 --snapshot-dir "$out/snaps"
      step reserved_growth 120 python3 bench/reserved_growth.py conv_fp32_sgd_ac_mb64 \
        --snapshot "$out/snaps/conv_fp32_sgd_ac_mb64.pickle.gz" ;;
    reserved_lstm)  # the checkpointed fp32 LSTM's allocator history (its reserved misses since two cuBLAS workspaces)
      step reserved_lstm_snap 120 python3 bench/bench_memory.py --suite heldout --steps 4 \
        --only lstm_fp32_ac_mb32 --snapshot lstm_fp32_ac_mb32 --snapshot-dir "$out/snaps"
      step reserved_lstm_growth 120 python3 bench/reserved_growth.py lstm_fp32_ac_mb32 \
        --snapshot "$out/snaps/lstm_fp32_ac_mb32.pickle.gz" ;;
    hooks)
      step hooks 100 python3 bench/bench_speed.py --only-hook-cost --hand-steps 20 \
        --hooks ddp_no_hook,fp16,fp16_builtin,powersgd_r4_ours ;;
    hooks_kernels)  # PowerSGD's products as Triton kernels against torch.bmm; the kernels' GPU test first
      step hooks_kernels_test 90 python3 -m pytest -q -x tests/gpu -k powersgd
      step hooks_kernels 150 python3 bench/bench_speed.py --only-hook-cost --hand-steps 30 \
        --hooks ddp_no_hook,fp16,powersgd_r4_ours_bmm,powersgd_r4_ours ;;
    hooks_tiles)  # PowerSGD's Triton products: tile sizes against bmm (GPT-2-small's matrices, rank 4)
      step hooks_tiles 120 python3 bench/probe_powersgd_kernels.py ;;
    hooks_profile)  # kernels and time per step by kernel: where a hook's step time goes
      step hooks_profile 150 python3 bench/bench_speed.py --only-hook-cost --hand-steps 30 --profile-hooks 3 \
        --hooks ddp_no_hook,fp16,powersgd_r4_ours ;;
    probe_orth)  # PowerSGD's ops one by one against a plain copy
      step probe_orth 240 python3 bench/probe_orth.py ;;
    fsdp_units_repeat)  # the candidates with two interleaved rounds, 60 steps
      step fsdp_units_repeat 420 python3 bench/bench_speed.py --steps 60 --repeat 2 --cases launcher_compiled,\
launcher_fsdp_compiled,launcher_fsdp_compiled_bpu2,launcher_fsdp_compiled_bpu4,launcher_eager,launcher_fsdp_eager_bpu2 ;;
    hooks_trace)  # timelines of 3 steps: DDP alone, PowerSGD r4 (side stream, the tail after backward)
      export HOOK_TRACE_DIR="$out/traces"
      step hooks_trace 90 python3 bench/bench_speed.py --only-hook-cost --hand-steps 20 \
        --profile-hooks 3 --hooks ddp_no_hook,powersgd_r4_ours
      unset HOOK_TRACE_DIR ;;
    hooks_buckets)  # PowerSGD with 100 MB buckets (4x fewer orthonormalisations) against 25 MB
      step hooks_buckets 120 python3 bench/bench_speed.py --only-hook-cost --hand-steps 30 \
        --hooks ddp_no_hook,ddp_no_hook_b100,powersgd_r4_ours,powersgd_r4_ours_b100,fp16 ;;
    hooks_fuse_add)  # PowerSGD's error added inside P's kernel (7 passes a step) against a pass of its own (8)
      step hooks_fuse_add_test 120 python3 -m pytest -q -x tests/gpu -k powersgd
      step hooks_fuse_add 200 python3 bench/bench_speed.py --only-hook-cost --hand-steps 30 --repeat 3 \
        --hooks ddp_no_hook,powersgd_r4_ours,powersgd_r4_ours_add_apart ;;
    hooks_repeat)  # three interleaved rounds: DDP alone, fp16, PowerSGD r4 (~2 min)
      step hooks_repeat 160 python3 bench/bench_speed.py --only-hook-cost --hand-steps 30 --repeat 3 \
        --hooks ddp_no_hook,fp16,powersgd_r4_ours ;;
    fsdp_auto)  # blocks_per_unit=auto (the default) against DDP, two interleaved rounds
      step fsdp_auto 330 python3 bench/bench_speed.py --steps 60 --repeat 2 \
        --cases launcher_compiled,launcher_fsdp_compiled,launcher_fsdp_compiled_bpu1,launcher_eager,launcher_fsdp_eager ;;
    fsdp_forward)  # blocks' forward compiled (FSDP's hooks outside the graphs) against compiled DDP
      step fsdp_forward 400 python3 bench/bench_speed.py --steps 60 --repeat 3 \
        --cases launcher_compiled,launcher_fsdp_compiled ;;
    fsdp_units)  # parallel.blocks_per_unit: FSDP's per-unit host work paid fewer times
      step fsdp_units 330 python3 bench/bench_speed.py --steps 40 --cases launcher_compiled,launcher_fsdp_compiled,\
launcher_fsdp_compiled_bpu2,launcher_fsdp_compiled_bpu3,launcher_fsdp_compiled_bpu4,launcher_fsdp_compiled_bpu6,\
launcher_eager,launcher_fsdp_eager,launcher_fsdp_eager_bpu4 ;;
    fp8)
      step fp8 280 python3 bench/bench_speed.py --steps 30 --cases d4096_bf16,d4096_fp8_tensorwise,d4096_fp8_tensorwise_head ;;
    fp8_share)  # issue 20 target 4: GEMM / attention / other kernel time per step, bf16 and fp8, and fp8's ceiling
      step fp8_gemms 90 python3 bench/probe_fp8_share.py gemms
      pairs=()
      widths=("d2048x8_bf16:2048 8 16" "d2048x8_fp8:2048 8 16 fp8" "d4096x8_bf16:4096 8 32" "d4096x8_fp8:4096 8 32 fp8")
      [ -n "${FP8_SHARE_ONLY:-}" ] && widths=("${widths[@]:2}")  # d 4096 only
      for v in "${widths[@]}"; do
        name=${v%%:*}; set -- ${v#*:}; rm -rf /tmp/share_$name
        step share_$name 170 python3 -m launcher experiment=gpt2_small recipe.data.max_bytes=4000000 \
          recipe.model.d_model=$1 recipe.model.n_layers=$2 recipe.model.n_heads=$3 train.micro_batch_size=8 \
          precision=${4:-bf16} train.steps=18 train.log_every=1 train.compile=true train.eval_every=0 checkpoint.every=0 \
          logger.progress_bar=false profile.enabled=true profile.wait=13 profile.warmup=2 profile.active=3 \
          run.dir=/tmp/share_$name
        pairs+=("$name=/tmp/share_$name")
        gzip -c /tmp/share_$name/profile/rank0_step*.json > "$out/trace_$name.json.gz"
      done
      step fp8_share 60 python3 bench/probe_fp8_share.py traces "${pairs[@]}" ;;
    fp8_mb)  # micro-batch 16 at 4096 x 8: the per-step costs (optimizer, weight casts) weigh less (fp8_mb2048: mb 32 at 2048)
      step fp8_mb 400 python3 bench/bench_speed.py --steps 30 \
        --cases d4096x8_mb16_bf16,d4096x8_mb16_fp8_tensorwise_head,d4096x8_mb16_fp8_tensorwise ;;
    fp8_mb_head)  # fp8_mb's two cases that matter: bf16, and fp8 with the head in fp8 (the fastest so far)
      step fp8_mb_head 320 python3 bench/bench_speed.py --steps 30 \
        --cases d4096x8_mb16_bf16,d4096x8_mb16_fp8_tensorwise_head ;;
    fp8_mb2048)
      step fp8_mb2048 400 python3 bench/bench_speed.py --steps 30 --cases d2048_mb32_bf16,d2048_mb32_fp8_tensorwise ;;
    fp8_mb_long)  # issue 20 target 4's measure: 4096 x 8, mb 16, 150 steps (30-step losses move ~1% between calls)
      step fp8_mb_long 400 python3 bench/bench_speed.py --steps 150 --cases d4096x8_mb16_bf16,d4096x8_mb16_fp8_tensorwise ;;
    fp8_xl)  # GPT-3 XL's shape (d 2048, 24 blocks, mb 16): bf16 against fp8, 100 steps
      step fp8_xl 420 python3 bench/bench_speed.py --steps 100 --cases d2048x24_mb16_bf16,d2048x24_mb16_fp8_tensorwise ;;
    fp8_deep)  # d 4096 with 8 blocks: fp8 against bf16 where the head weighs less (issue 20 target 4)
      step fp8_deep 420 python3 bench/bench_speed.py --steps 40 \
        --cases d4096x8_bf16,d4096x8_fp8_tensorwise,d4096x8_fp8_tensorwise_head ;;
    memory)  # issue 11's table, the refusal demo and the leak check
      step memory "${MEMORY_S:-320}" python3 bench/bench_memory.py --steps 4 --out "$out/memory.jsonl" ;;
    serve)
      step serve "${SERVE_S:-110}" python3 bench/bench_serve.py --quick ;;
    observe)
      step observe "${OBSERVE_S:-110}" python3 bench/bench_observe.py --quick --out "$out/observe.json" ;;
    confirm)  # one short call (~4.5 min): compiled FSDP against DDP (two rounds), the conv and LSTM held-out cases
      step fsdp_forward2 250 python3 bench/bench_speed.py --steps 60 --repeat 2 \
        --cases launcher_compiled,launcher_fsdp_compiled
      step conv_lstm_heldout 150 python3 bench/bench_memory.py --suite heldout --jobs 4 --steps 4 \
        --only conv_fp32_sgd_ac_mb64,conv_bf16_adamw_mb128,lstm_bf16_mb32,lstm_fp32_ac_mb32
      step lstm_heldout2 100 python3 bench/bench_memory.py --suite heldout2 --jobs 2 --steps 4 \
        --only lstm_bf16_ac_mb64,lstm_fp32_mb32 ;;
    heldout)
      step heldout 300 python3 bench/bench_memory.py --suite heldout --jobs 6 --steps 4 --out "$out/heldout.jsonl" ;;
    heldout2)
      step heldout2 120 python3 bench/bench_memory.py --suite heldout2 --jobs 6 --steps 4 --out "$out/heldout2.jsonl" ;;
    heldout3)  # the issue's last row (vocab 128256, bias + mlp_ratio 8 + accumulation, d 2048 fp32 AC SGD, compile mb 24)
      step heldout3 150 python3 bench/bench_memory.py --suite heldout3 --jobs 4 --steps 4 --out "$out/heldout3.jsonl" ;;
    rnn)  # GRU and tanh RNN: cuDNN's per-op memory (probe) and whole runs against the current estimate
      step rnn_probe 120 python3 bench/probe_memory.py rnn
      step rnn_cells 120 python3 bench/bench_memory.py --suite rnn --jobs 3 --steps 4 --out "$out/rnn.jsonl" ;;
    lstm2_snap)  # the two-layer checkpointed fp32 LSTM's allocator history (-7.2% / -15.3% at its first measure)
      step lstm2_snap 120 python3 bench/bench_memory.py --suite rnn --steps 4 \
        --only lstm2_fp32_ac_mb16 --snapshot lstm2_fp32_ac_mb16 --snapshot-dir "$out/snaps"
      step lstm2_growth 120 python3 bench/reserved_growth.py lstm2_fp32_ac_mb16 \
        --snapshot "$out/snaps/lstm2_fp32_ac_mb16.pickle.gz" ;;
    rnn_confirm)  # every recurrent case against the estimate (the workspace's two parts, aten's copies)
      step rnn_cells 120 python3 bench/bench_memory.py --suite rnn --jobs 3 --steps 4 --out "$out/rnn.jsonl"
      step rnn_heldout 120 python3 bench/bench_memory.py --suite heldout --jobs 2 --steps 4 \
        --only lstm_bf16_mb32,lstm_fp32_ac_mb32 --out "$out/rnn_heldout.jsonl"
      step rnn_heldout2 120 python3 bench/bench_memory.py --suite heldout2 --jobs 2 --steps 4 \
        --only lstm_fp32_mb32,lstm_bf16_ac_mb64 --out "$out/rnn_heldout2.jsonl" ;;
    peaks)
      step peaks 150 python3 bench/probe_peak.py lstm_fp32_ac_mb32 lstm_bf16_ac_mb64 conv_fp32_sgd_ac_mb64 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
# The device tool brings back at most 8 files: everything as one archive beside the summary.
tar czf /tmp/gpu_out.tgz -C "$out" . && find "$out" -type f ! -name gpu.txt -delete && mv /tmp/gpu_out.tgz "$out/all.tgz"
