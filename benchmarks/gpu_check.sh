#!/usr/bin/env bash
# The one prepared run for a session lent a GPU: the `cuda` tests, then the GPU figures of the
# GPU issue. MNIST comes from the four IDX files in DIR (default gpu-data/, git-ignored: copy
# ../shared/data/mnist/* there and pass it in the device tool's `carry`).
#   bash benchmarks/gpu_check.sh [DIR] [STEP ...]
# STEPs (default: all, in this order):
#   env       the card, torch, CUDA
#   tests     pytest -m cuda tests/test_cuda.py
#   fast      time_to_accuracy: `fast`, 1 epoch, seeds 0-4 (target: 99.0% in <= 0.4 s)
#   fastlong  time_to_accuracy: `fast-long`, 5 epochs, seeds 0-2 (target: 99.5% in <= 3 s)
#   speed     gpu_speed: seed2017 3 epochs (>= 150,000 images/s), best 15 epochs (<= 15 s)
#   ensemble  `digitlab ensemble --preset best --members 5 --jobs $GPU_CHECK_JOBS` (default 1), wall clock
#             (target <= 90 s), then test accuracy; GPU_CHECK_JOBS=5 trains the members side by side on the card
# Each step writes STEP.txt under $OUT (the device tool brings that folder back) or gpu-results/,
# and stops at its own limit or at the script's deadline (GPU_CHECK_SECONDS, default 560: the
# device tool's 600-s command limit less a margin), so one slow step cannot eat the others' time.
# Steps that did not fit can be run in a second call: bash benchmarks/gpu_check.sh gpu-data speed ensemble
# With device time left, issue 11's full-width committee: bash benchmarks/gpu_committee.sh [DIR] 5
set -u
dir=${1:-gpu-data}
shift || true
steps=("$@")
known=(env tests fast fastlong speed ensemble)
[ ${#steps[@]} -eq 0 ] && steps=("${known[@]}")
for step in "${steps[@]}"; do
  [[ " ${known[*]} " == *" $step "* ]] || { echo "unknown step '$step': ${known[*]}" >&2; exit 2; }
done
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-560}))
device=${GPU_CHECK_DEVICE:-cuda}  # cpu: a dry run of the script on a machine without a GPU
data=(--train "idx:$dir" --test "idx:$dir:test" --device "$device")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run_step() {  # NAME LIMIT_S COMMAND...: the command's output to the terminal and to $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 5)); then
    echo "== $name: skipped, the script's deadline has passed" | tee "$out/$name.txt"
    return
  fi
  echo "== $name (at most ${limit} s)" | tee "$out/$name.txt"
  local start=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s$( ((rc == 124)) && echo ', stopped at its limit')" \
    | tee -a "$out/$name.txt"
}

ensemble() {  # five `best` members on all 60,000 training images, then their accuracy on the test set
  local start=$SECONDS
  python -m digitlab ensemble --preset best --members 5 --data "idx:$dir" --val-split 0 --out "$work/ensemble" \
    --jobs "${GPU_CHECK_JOBS:-1}" --quiet || return
  echo "ensemble of 5 best, --jobs ${GPU_CHECK_JOBS:-1}: $((SECONDS - start)) s wall clock (data loading and 5 x 15 epochs)"
  python - "$work/ensemble" <<'EOF'
import json, pathlib, sys
members = sorted(pathlib.Path(sys.argv[1]).glob("member-*/model.json"))
seconds = [json.loads(m.read_text())["train_seconds"] for m in members]
print(f"training seconds per member: {', '.join(f'{s:.1f}' for s in seconds)}; sum {sum(seconds):.1f}")
EOF
  python -m digitlab evaluate "$work/ensemble" --data "idx:$dir:test" --mistakes 0
}
export -f ensemble  # `timeout` runs it in a child bash
export dir work

for step in "${steps[@]}"; do
  case $step in
    env) run_step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
      python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())"' ;;
    tests)
      if python -c "import pytest" 2>/dev/null; then
        run_step tests 150 python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
      else
        echo "pytest is not installed here: the cuda tests were not run" | tee "$out/tests.txt"
      fi ;;
    fast) run_step fast 90 python benchmarks/time_to_accuracy.py "${data[@]}" --runs fast:1 --seeds 0 1 2 3 4 ;;
    fastlong) run_step fastlong 90 python benchmarks/time_to_accuracy.py "${data[@]}" --runs fast-long:5 --seeds 0 1 2 ;;
    speed) run_step speed 150 python benchmarks/gpu_speed.py "${data[@]}" --runs seed2017:3 best:15 ;;
    ensemble) run_step ensemble 300 bash -c ensemble ;;
  esac
done
