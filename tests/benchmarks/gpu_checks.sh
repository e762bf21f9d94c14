#!/bin/bash
# The learner-side checks that need one CUDA GPU, in one go (on an H200 its commands took about 6 minutes
# with the tiny Stage-1 models cached; a fresh machine builds them first; the figures of 2026-11-30 are in
# docs/benchmarks.md "On one GPU"). No rollout server: every run uses rollout=hf.
#   [PYTHON=.venv/bin/python] bash tests/benchmarks/gpu_checks.sh [out_dir]   (default /tmp/coordexp-gpu-checks)
# Writes one log per check under out_dir and prints each check's exit code; exits non-zero if any failed.
set -o pipefail
out=${1:-/tmp/coordexp-gpu-checks}
python=${PYTHON:-python}  # the interpreter coordexp is installed in
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

check() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s ($out/$name.log)"
  grep -v "Loading weights" "$out/$name.log" | tail -8
  [ $rc -eq 0 ] || failed=1
}

train() {  # name, timeout (s), overrides...
  local name=$1 limit=$2; shift 2
  rm -rf "$out/$name"
  check "$name" "$limit" "$python" -m coordexp.train "$@" "hydra.run.dir=$out/$name"
}

# packing and soft self-context throughput (issue 19's targets), text and VL tiny models
check packing 600 "$python" tests/benchmarks/bench_packing.py --device cuda 9 1024
# the memory planner against torch.cuda.max_memory_allocated (random ~1B Qwen2)
check memory_plan 600 "$python" tests/benchmarks/bench_memory_plan.py --gpu
# the learner end to end on CUDA: plain, FSDP2 on one GPU with bf16 + checkpointing (text and VL)
train smoke_fp32 600 +experiment=smoke/ab_mixed rollout=hf
train vl_fp32 300 +experiment=smoke/ab_mixed_vl rollout=hf training.max_steps=20
train fsdp_bf16_ckpt 300 +experiment=smoke/ab_mixed rollout=hf training.fsdp=true training.precision=bf16 \
  training.gradient_checkpointing=true training.max_steps=20
train fsdp_vl 300 +experiment=smoke/ab_mixed_vl rollout=hf training.fsdp=true training.precision=bf16 \
  training.gradient_checkpointing=true training.max_steps=20
# a LoRA/DoRA adapter on a tied checkpoint under FSDP: refused with the fix (exit 2, no traceback)
log=$out/fsdp_dora_refused.log
timeout 300 "$python" -m coordexp.train +experiment=smoke/ab_mixed rollout=hf training.fsdp=true \
  model.adapter.kind=dora training.max_steps=2 "hydra.run.dir=$out/fsdp_dora_refused" > "$log" 2>&1
rc=$?
echo "== fsdp_dora_refused: exit $rc (expected 2)"
grep "^error: " "$log"
[ $rc -eq 2 ] && grep -q "ties its head to its input embedding" "$log" && ! grep -q Traceback "$log" || failed=1
exit $failed
