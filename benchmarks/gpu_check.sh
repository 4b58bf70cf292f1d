#!/usr/bin/env bash
# The one prepared run for a session lent a GPU: the `cuda` tests, then the GPU figures of the
# GPU issue. MNIST comes from the four IDX files in DIR (default gpu-data/, git-ignored: copy
# ../shared/data/mnist/* there and pass it in the device tool's `carry`).
#   bash benchmarks/gpu_check.sh [DIR]
# With device time left, issue 11's full-width committee: bash benchmarks/gpu_committee.sh [DIR] 5
set -u
dir=${1:-gpu-data}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if python -c "import pytest" 2>/dev/null; then
  python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
else
  echo "pytest is not installed here: the cuda tests were not run"
fi
data=(--train "idx:$dir" --test "idx:$dir:test" --device cuda)
python benchmarks/time_to_accuracy.py "${data[@]}" --runs fast:1 --seeds 0 1 2 3 4
python benchmarks/time_to_accuracy.py "${data[@]}" --runs fast-long:5 --seeds 0 1 2
python benchmarks/gpu_speed.py "${data[@]}" --runs seed2017:3 best:15
