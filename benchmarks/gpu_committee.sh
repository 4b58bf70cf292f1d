#!/usr/bin/env bash
# Issue 11 on a GPU: ttdoucet/mnist's committee at the anchor's full width. MEMBERS `resnet` nets of
# WIDTH (the anchor: 128, ~25x the CPU preset's compute per image) train on MNIST's training set with
# the same 10% held out (split seed 0); benchmarks/ensemble_select.py then chooses the committee on
# those held-out images and measures it once on the test set. Data: the four IDX files in DIR
# (default gpu-data/, git-ignored; carry it with the device tool).
#   bash benchmarks/gpu_committee.sh [DIR] [MEMBERS] [WIDTH] [EPOCHS] [DEVICE] [OUT]
# GPU_TRAIN_FLAGS adds flags to every member's `digitlab train`, e.g. GPU_TRAIN_FLAGS=--no-cuda-graphs (eager;
# CUDA graphs are the default on one GPU under torch >= 2.11).
set -eu
dir=${1:-gpu-data} members=${2:-10} width=${3:-128} epochs=${4:-15} device=${5:-cuda} out=${6:-runs/committee}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
python - "$dir" "$width" "$epochs" "$device" "$out/config.json" <<'EOF'
import json, sys
from digitlab.presets import get_preset
data, width, epochs, device, path = sys.argv[1:]
config = get_preset("resnet").with_overrides(data=f"idx:{data}", val_split=0.1, epochs=int(epochs), device=device)
body = config.to_dict() | {"model_args": {"width": int(width)}, "split_seed": 0}
json.dump({"config": body}, open(path, "w"), indent=1)
EOF
read -r -a flags <<< "${GPU_TRAIN_FLAGS:-}"
runs=()
for ((seed = 0; seed < members; seed++)); do
  run="$out/member-$seed"
  runs+=("$run")
  [ -f "$run/model.json" ] && continue
  if [ -f "$run/checkpoint.safetensors" ]; then
    python -m digitlab train --resume "$run" --quiet "${flags[@]}"
  else
    python -m digitlab train --config "$out/config.json" --seed "$seed" --out "$run" --quiet "${flags[@]}"
  fi
  python -c "import json, sys; m = json.load(open(sys.argv[1])); print(sys.argv[2], 'val', m['metrics']['val_acc'], \
'train s', round(m['train_seconds'], 1))" "$run/model.json" "$run"
done
python benchmarks/ensemble_select.py "${runs[@]}" --test "idx:$dir:test" --device "$device" --max-members "$members"
