#!/usr/bin/env bash
# The one prepared GPU check, for a borrowed machine that has JAX with CUDA (and numpy, pyyaml, pillow)
# but no TensorFlow, Keras, MLflow or internet. Through pipeline.fitting (the training code) on the JAX
# backend it measures, most important first, each stage under its own time limit so that one slow
# stage cannot take the others' results with it:
#   1. params/fast.yaml, its whole schedule on the real images: fit seconds and test_acc (all 10,000);
#   2. params/improved.yaml (ResNet-164 with the tricks): seconds per epoch, projected 150 epochs;
#   3. the seed recipe (params/default.yaml): seconds per epoch, projected 150 epochs;
#   4. fast.yaml's next steps, whole schedules with test_acc, as many as the call's budget leaves time for:
#      every GPU run before 2026-12-03 trained without the ResNet-9's two residual pairs (model.zero_init_residual
#      froze them at zero) and with a trained prep conv, so stage 1 is the first GPU measure of the recipe as it is.
#      On a 2-core CPU (bench/results/fast-cpu.md) its 16 epochs reached test_acc 0.905 with reflect padding (0.900-0.902
#      with zeros; 10 epochs 0.889-0.891; 0.886 with the layout before: trained prep conv, BN before pooling; 0.862 with
#      the pairs frozen), train acc 0.974 vs val_acc 0.907: short of 0.94 on any hardware. So first 24 epochs (Page's
#      baseline length; at the 0.44-0.55 s per epoch measured here on 2026-11-30, 11-13 s of epochs after the compiling
#      first: does the JPEG copy allow 0.94 at a length near 10 s at all?). Then 16 epochs with ghost batch norm
#      (model.ghost_batch=32, Page's; train.drop_remainder with it): in a quarter-width CPU proxy (5 epochs) it was ahead
#      at epochs 3-4 and behind at the end (bench/results/fast-cpu.md); whether it pays at 16 is cheap to ask here and
#      costs ~2.5 h on a slow 2-core CPU. Then 16 epochs with alternating flips (train.alternate_flip, airbench's: every
#      image seen both ways in any two epochs): in the same 5-epoch CPU proxy val_acc 0.846 vs 0.848 (two seeds), too
#      short a run to show a gain of tenths of a point. Then 40 epochs (how high this recipe goes on the JPEG copy at
#      all), 10 (does the GPU agree that 16 are worth their time?) and 24 with cutout 8 (Page's regulariser: on the CPU
#      at 16 epochs with zeros padding: val_acc 0.8956 vs 0.896, train acc 0.940 vs 0.975).
#      The first three stages take ~6 minutes of the call (2026-11-30: 69, 160 and 132 s), so the first two or three
#      of these fit; the rest are skipped, with a line saying so.
#      Not weight EMA: Keras's use_ema averages the trainable weights, not the BN statistics, and cost 1.2-1.9 points
#      of val_acc in a quarter-width CPU proxy.
#
# Here, once: the wheels that machine lacks (keras and the two it needs beyond that image; CPython 3.12),
# about 3 MB, and the JPEG copy of CIFAR-10 (20 MB), both ignored by git:
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl keras==3.15.1 namex optree
#   mkdir -p .data && cp ../shared/datasets/cifar10-jpeg-q75.tar.gz .data/
# Then through the device tool: run(command="bash bench/gpu.sh", carry=[".whl", ".data"], timeout_s=580).
# Results come back in $OUT (gpu-*.json, gpu.txt, gpu.log); copy them to bench/results/.
#
# A CPU rehearsal at toy scale (synthetic images, tiny widths, 2 epochs), for any machine with JAX:
#   GPU_SH_SMOKE=1 OUT=/tmp/gpu-smoke bash bench/gpu.sh
set -uo pipefail
OUT=${OUT:-bench/results}
DATA=${DATA:-.data/cifar10-jpeg-q75.tar.gz}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2  # before the check: Keras's default backend is TF
if ! "$PY" -c "import keras" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .whl/*.whl \
    || { echo "installing .whl failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import jax, keras; print('jax', jax.__version__, 'keras', keras.__version__, jax.devices())"
} 2>&1 | tee "$OUT/gpu.txt"

source_args=(--data "$DATA") small9="" small164="" ghost_batch=""
if [[ -n "${GPU_SH_SMOKE:-}" ]]; then
  source_args=(--images 512) small9="train.epochs=2 model.widths=[8,16,32,64]"
  ghost_batch="train.batch_size=64"  # 501 training images make no whole batch of 512
  small164="model.units_per_stage=1 model.widths=[16,32,64]"
fi

failed=0 budget=${GPU_SH_BUDGET:-570}  # the call's own limit (run's timeout_s) less a margin
stage() {  # stage NAME SECONDS ARGS...: one bench.gpu_epoch run, its console in gpu.log; skipped without the time
  local name=$1 limit=$2; shift 2
  if (( SECONDS + limit > budget )); then
    echo "== $name skipped: ${SECONDS}s of ${budget}s used, it may take ${limit}s" | tee -a "$LOG"
    return
  fi
  echo "== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "$PY" -m bench.gpu_epoch "${source_args[@]}" \
    --out "$OUT/gpu-$name.json" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name exit $rc $(date -u +%T)" | tee -a "$LOG"
  [[ $rc == 0 ]] || failed=1
}
stage fast "${FAST_LIMIT:-220}" --full --params params/fast.yaml --overrides "train.feed=device $small9"
stage improved "${IMPROVED_LIMIT:-180}" --epochs 2 --params params/improved.yaml \
  --overrides "train.feed=device train.steps_per_execution=8 $small164"
stage seed "${SEED_LIMIT:-150}" --epochs 2 --params params/default.yaml \
  --overrides "train.feed=device train.steps_per_execution=8 $small164"
# Measured 2026-11-30: a whole fast.yaml schedule (10 epochs then) took 69 s here (improved 160 s, seed 132 s), ~45 s of it
# compiling.
stage explore-24 "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.epochs=24 $small9"
stage explore-16-ghost "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device model.ghost_batch=32 train.drop_remainder=true $small9 $ghost_batch"
stage explore-16-altflip "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.alternate_flip=true $small9"
stage explore-40 "${EXPLORE_LIMIT:-90}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.epochs=40 $small9"
stage explore-10 "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.epochs=10 $small9"
stage explore-24-cutout "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.epochs=24 train.cutout=8 $small9"
exit $failed
