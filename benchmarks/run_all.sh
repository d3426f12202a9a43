#!/usr/bin/env bash
# Runs every benchmark on the real data, one after another (never two at once:
# they would share the cores and distort each other). Results land in
# benchmarks/results/. Usage: bash benchmarks/run_all.sh [../shared/data]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
python -m benchmarks.throughput --source_dir="$DATA/chest_xray_fullres" --plot
python -m benchmarks.throughput --source_dir="$DATA/chest_xray_224" --plot
python -m benchmarks.epoch --source_dir="$DATA/chest_xray_fullres" --plot
python -m benchmarks.epoch --source_dir="$DATA/chest_xray_224" --plot
# The full model x precision x XLA matrix takes hours on a 2-core CPU; these two runs
# cover it where it matters there (drop the flags on a GPU box to time everything).
python -m benchmarks.train_step --source_dir="$DATA/chest_xray_224" --models=bn_cnn,manual_cnn \
    --precisions=float32,mixed_bfloat16,mixed_float16 --jit=false,true --steps=3 --repeats=2 \
    --warmup_steps=1 --plot --name=train_step-small-chest_xray_224
python -m benchmarks.train_step --source_dir="$DATA/chest_xray_224" --models=vgg16,resnet50 \
    --precisions=float32,mixed_bfloat16 --jit=false --steps=2 --repeats=2 --warmup_steps=1 \
    --plot --name=train_step-backbones-chest_xray_224
python -m benchmarks.prepare --source_dir="$DATA/chest_xray_fullres"
python -m benchmarks.prepare --source_dir="$DATA/chest_xray_224" --repeats=2
python -m benchmarks.prepare --dicom
# Threads against Beam: needs apache-beam, which may live in its own virtualenv
# (BEAM_PYTHON=/path/to/venv/bin/python bash benchmarks/run_all.sh).
BEAM_PYTHON=${BEAM_PYTHON:-python}
if "$BEAM_PYTHON" -c "import apache_beam" 2>/dev/null; then
    "$BEAM_PYTHON" -m benchmarks.prepare --source_dir="$DATA/chest_xray_fullres" \
        --runners=threads,beam-startup:1,beam-startup:2,beam:1,beam:2 --repeats=2
else
    echo "skipping benchmarks.prepare --runners: $BEAM_PYTHON cannot import apache_beam" >&2
fi
python -m benchmarks.encoding --source_dir="$DATA/chest_xray_224"
# Images/s against replicas (GPUs where present, else logical CPU devices) and tf.data service
# workers; the fit-vs-loop cells interleaved over rounds (steadier on a shared machine).
python -m benchmarks.scaling --source_dir="$DATA/chest_xray_224" --shard_mb=4 --rounds=2
python -m benchmarks.scaling --source_dir="$DATA/chest_xray_224" --shard_mb=4 --sections=fit \
    --rounds=4 --steps=16 --name=scaling-fit_vs_loop-chest_xray_224
# Serving routes and train/serve skew need a trained, evaluated and exported model_dir
# (docs/serving.md): MODEL_DIR=runs/cnn bash benchmarks/run_all.sh
if [[ -n "${MODEL_DIR:-}" ]]; then
    python -m benchmarks.serving --model_dir="$MODEL_DIR" --split=test
    python -m benchmarks.parity --model_dir="$MODEL_DIR" --source_dir="$DATA/chest_xray_fullres"
    python -m benchmarks.parity --model_dir="$MODEL_DIR" --source_dir="$DATA/chest_xray_224" \
        --limit=1500
fi
