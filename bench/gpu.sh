#!/usr/bin/env bash
# The one prepared GPU check, for a borrowed machine that has JAX with CUDA (and numpy, pyyaml, pillow)
# but no TensorFlow, Keras, MLflow or internet. Through pipeline.fitting (the training code) on the JAX
# backend it measures, most important first, each stage under its own time limit so that one slow
# stage cannot take the others' results with it:
#   1. params/fast.yaml, its whole schedule on the real images: fit seconds and test_acc (all 10,000);
#   2. the seed recipe (params/default.yaml): seconds per epoch, projected 150 epochs;
#   3. params/improved.yaml (ResNet-164 with the tricks), its whole 150 epochs and test_acc, for the rest of the
#      call: its ~13 minutes (projected 13.2, bench/results/gpu.md) outlast one call (10 at most), so it stops
#      cleanly before the call's end with its training saved in .gpu-state/improved (bench.gpu_epoch
#      --checkpoint), which comes back packed with the results and goes with the next call (carry ".gpu-state"),
#      which goes on from it;
#   4. once improved.yaml is whole, fast.yaml's next steps, whole schedules with test_acc, as long as time is left.
#   While improved.yaml's run is unfinished a call goes on with it first (1 and 2 were measured by the call that
#   began it) and runs nothing after it, unless it does not go on (a checkpoint of other settings is refused, by
#   name; or it crashes): then fast and seed run after it. Once whole, its result is kept in
#   .gpu-state/improved.json (carried) and later calls skip it (remove that file to train it again).
# GPU_SH_STAGES="improved" (names separated by spaces) runs only those stages: a second call in one lease, with
# GPU_SH_BUDGET set to its timeout_s (or the device time left, if less) less 10: a call the device tool ends before
# the script packs its files brings the training of that call back to no one (its loose files come back, at most 8,
# and bench.gpu_report --unpack takes them; its table says `not run` of each stage gpu.log names without a file).
# Measured 2026-12-04 on one H200 (bench/results/gpu.md): fast.yaml at 16 epochs test_acc 0.9058, at 24 0.9100, at
# 24 with cutout 8 0.9123 (now the file: 7.4 s of epochs after a 24.8 s compiling first one), at 40 0.9131 (val_acc
# flat, 0.906-0.908, over its last three epochs): on the JPEG copy this ResNet-9 stops near 0.91, short of 0.94 at any length tried. 16 epochs with ghost
# batch norm and train.drop_remainder: 0.9099 vs 0.9058, and a first epoch of 11.9 s instead of 23.5 s: whole batches
# only spare XLA a second compile for the last, partial one. improved.yaml: 4.63 s per epoch after a first of 100 s.
# The next questions about fast.yaml: the file at 1.5x the width (2.2x the computation: does capacity lift the
# plateau on the JPEG copy, and what does it cost in seconds?), drop_remainder alone (does it halve the compile?),
# weight EMA with its BN statistics recomputed (train.ema_bn_batches; in the 5-epoch quarter-width CPU proxy,
# bench/results/fast-cpu.md, level with the raw weights: 0.849 vs 0.847, 0.832 without), a second train.seed (the
# spread of one measurement), ghost batch norm at 24 epochs, 32 epochs, and alternating flips at 24 (at 16: 0.9063
# vs 0.9058). Every whole schedule also records val_acc and test_acc with each test-time augmentation (none, flip,
# flip_shift; bench.gpu_epoch's tta_scores).
#      On 2026-12-04 fast took 49 s of the call, two epochs of improved 114 s, each explore stage ~50 s; the seed
#      stage ~90 s on 2026-11-30.
#
# Here, once: the wheels that machine lacks (keras and the two it needs beyond that image, whose python3 was 3.12;
# optree is built for one CPython, so also for the ones beside it: pip there picks the one that fits), 3.8 MB, and
# the JPEG copy of CIFAR-10 (20 MB), both ignored by git:
#   for v in 3.12 3.11 3.13; do pip download -q --no-deps --only-binary=:all: --python-version $v --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl keras==3.15.1 namex optree==0.20.0; done
#   mkdir -p .data && cp ../shared/datasets/cifar10-jpeg-q75.tar.gz .data/
# It installs keras from .whl unless the machine's Python has that very version, and namex and optree where it lacks
# them; a misspelt GPU_SH_STAGES, wheels that fit no Python there, or a keras that does not import with its JAX end
# the call at once with one line saying so (in gpu.log, packed as below).
# Then through the device tool: run(command="bash bench/gpu.sh", carry=[".whl", ".data", ".gpu-state"],
# timeout_s=580). That machine returns at most 8 files of 16 MiB, so with OUT set elsewhere than bench/results the
# script ends by packing its files (gpu-*.json, gpu.txt, gpu.log, and .gpu-state: improved's training or result) into
# $OUT/gpu-results.tar.gz, cut into 15 MiB pieces (.part0, .part1, ...) where it is larger; here, then:
#   python -m bench.gpu_report --unpack PATH/gpu-results.tar.gz   (extracts the results into bench/results and
#   .gpu-state into the checkout, replacing the one carried, and writes gpu.md)
#
# A CPU rehearsal at toy scale (synthetic images, tiny widths, 2 epochs), for any machine with JAX:
#   GPU_SH_SMOKE=1 OUT=/tmp/gpu-smoke bash bench/gpu.sh
set -uo pipefail
OUT=${OUT:-bench/results}
DATA=${DATA:-.data/cifar10-jpeg-q75.tar.gz}
PY=${PYTHON:-python3}
SITE=${GPU_SH_SITE:-/tmp/gpu-site}  # where the wheels go (emptied first: a warm machine keeps an earlier call's)
STAGES="fast seed improved explore-wide explore-drop explore-ema explore-seed1 explore-24-ghost explore-32
  explore-24-altflip"
for name in ${GPU_SH_STAGES:-}; do  # a misspelt name would run nothing and waste the call
  [[ " ${STAGES//$'\n'/ } " == *" $name "* ]] \
    || { echo "GPU_SH_STAGES: no stage '$name' (stages: $(echo $STAGES))" >&2; exit 2; }
done
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
echo "== call of $(date -u '+%F %T') UTC" | tee -a "$LOG"  # the date of the stages this log names (bench.gpu_report)
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2  # before the check: Keras's default backend is TF
# Keras from .whl unless this Python has that very version (another one would measure other code); namex and optree
# from there where this Python lacks them, chosen by pip among the wheels of each Python .whl holds (an optree wheel
# is built for one CPython; keras and namex are pure Python)
wheel=$(compgen -G ".whl/keras-*.whl" | head -1) want=${wheel#.whl/keras-} want=${want%%-*}
if [[ -n $want ]] && ! "$PY" -c "import keras, sys; sys.exit(keras.__version__ != '$want')" 2>/dev/null; then
  need=("keras==$want")
  for module in namex optree; do "$PY" -c "import $module" 2>/dev/null || need+=("$module"); done
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links .whl --target "$SITE" \
    "${need[@]}" 2>&1 | tee -a "$LOG"
  if (( PIPESTATUS[0] )); then
    echo "installing ${need[*]} from .whl failed for $("$PY" -V 2>&1) (.whl holds: $(cd .whl && echo *.whl))" \
      | tee -a "$LOG"
    exit 1
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, jax, keras; print('python', sys.version.split()[0], 'jax', jax.__version__, 'keras',
    keras.__version__, jax.devices())"
} 2>&1 | tee "$OUT/gpu.txt"
if (( PIPESTATUS[0] )); then  # every stage would fail the same way after its imports: say why once, and stop
  echo "== no stage run: keras ${want:-(no .whl)} and this machine's JAX and Python do not import together" \
    "(gpu.txt says why)" | tee -a "$LOG"
  stopped=1
fi

# Each key once in an overrides string (pipeline.config refuses one given twice, where the last would win unseen):
# the smoke's toy scale replaces, not follows, a stage's own widths and epochs (wide9, long9)
source_args=(--data "$DATA") small9="" small164="" ghost_batch="" short164=""
wide9="model.widths=[64,192,384,768]" long9="train.epochs=32"
if [[ -n "${GPU_SH_SMOKE:-}" ]]; then
  source_args=(--images 512) small9="train.epochs=2 model.widths=[8,16,32,64]"
  wide9="train.epochs=2 model.widths=[8,24,48,96]" long9="train.epochs=3 model.widths=[8,16,32,64]"
  ghost_batch="train.batch_size=64"  # 501 training images make no whole batch of 512
  small164="model.units_per_stage=1 model.widths=[16,32,64]" short164="train.epochs=3"
  STATE=${GPU_SH_STATE:-$OUT/state-smoke}  # never the checkout's own
fi
STATE=${STATE:-${GPU_SH_STATE:-.gpu-state}}  # improved.yaml's training between calls

failed=0 budget=${GPU_SH_BUDGET:-570}  # the call's own limit (run's timeout_s) less a margin
stage() {  # stage NAME SECONDS ARGS...: one bench.gpu_epoch run, its console in gpu.log; skipped without the time
  local name=$1 limit=$2; shift 2
  if [[ -n "${GPU_SH_STAGES:-}" && " $GPU_SH_STAGES " != *" $name "* || -n ${stopped:-} ]]; then
    return
  fi
  if (( SECONDS + limit > budget )); then
    [[ -n $unfinished ]] \
      || echo "== $name skipped: ${SECONDS}s of ${budget}s used, it may take ${limit}s" | tee -a "$LOG"
    return
  fi
  echo "== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "$PY" -m bench.gpu_epoch "${source_args[@]}" \
    --out "$OUT/gpu-$name.json" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name exit $rc $(date -u +%T)" | tee -a "$LOG"
  [[ $rc == 0 ]] && passed+=" $name " || { failed=1 failures+=" $name "; }
}
# an unfinished improved.yaml run: a checkpoint saved (a folder without one, stopped before its first save, begins
# afresh like no folder)
resumable() { [[ -f "$STATE/improved/training_metadata.json" ]]; }
fast_and_seed() {
  stage fast "${FAST_LIMIT:-220}" --full --params params/fast.yaml --overrides "train.feed=device $small9"
  stage seed "${SEED_LIMIT:-150}" --epochs 2 --params params/default.yaml \
    --overrides "train.feed=device train.steps_per_execution=8 $small164"
}
passed="" failures="" unfinished="" resumed=""
if resumable && [[ -z "${GPU_SH_STAGES:-}" ]]; then  # measured by the call that began that run
  resumed=1
  [[ -n ${stopped:-} ]] \
    || echo "== fast, seed skipped: improved.yaml's unfinished run ($STATE/improved) goes on first" | tee -a "$LOG"
else
  fast_and_seed
fi
# the rest of the call less a margin for packing: it stops itself at an epoch's end 60 s before its limit,
# for the scoring after its last epoch (its predict compiles; not timed yet on a GPU)
left=$(( budget - SECONDS - 20 ))
if [[ -n ${stopped:-} ]]; then
  :
elif [[ -f "$STATE/improved.json" ]]; then  # else each later call would begin it afresh and leave no time for the rest
  echo "== improved skipped: whole in an earlier call ($STATE/improved.json; remove it to train it again)" \
    | tee -a "$LOG"
elif (( left >= 150 )); then  # its first epoch compiles for ~100 s
  stage improved "$left" --full --params params/improved.yaml --checkpoint "$STATE/improved" \
    --stop-after "$(( left - 60 ))" --overrides "train.feed=device train.steps_per_execution=8 $small164 $short164"
  if [[ "$passed" == *" improved "* && ! -d "$STATE/improved" ]]; then  # whole and scored
    mkdir -p "$STATE" && cp "$OUT/gpu-improved.json" "$STATE/improved.json"
  fi
else
  echo "== improved skipped: ${left}s left of the call" | tee -a "$LOG"
fi
if [[ -n $resumed && "$failures" == *" improved "* ]]; then
  # the run it skipped them for did not go on (refused: a checkpoint of other settings, its line above; or it
  # crashed): the call's first measurements still come first
  echo "== improved did not go on from $STATE/improved (its lines above say why): fast and seed run now" \
    | tee -a "$LOG"
  fast_and_seed
fi
if resumable && [[ -z "${GPU_SH_STAGES:-}${stopped:-}" && "$failures" != *" improved "* ]]; then
  # unfinished: the next call goes on with it before anything else (stages named in GPU_SH_STAGES run; one that
  # failed here, refused or crashed, leaves the rest of the call to the next stages)
  budget=0 unfinished=1
  echo "== the next stages skipped: improved.yaml's run is unfinished ($STATE/improved), the next call goes on" \
    "with it first" | tee -a "$LOG"
fi
stage explore-wide "${EXPLORE_LIMIT:-100}" --full --params params/fast.yaml \
  --overrides "train.feed=device $wide9"
stage explore-drop "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.drop_remainder=true $small9 $ghost_batch"
stage explore-ema "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.ema=true $small9"
stage explore-seed1 "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.seed=1 $small9"
stage explore-24-ghost "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device model.ghost_batch=32 train.drop_remainder=true $small9 $ghost_batch"
stage explore-32 "${EXPLORE_LIMIT:-80}" --full --params params/fast.yaml \
  --overrides "train.feed=device $long9"
stage explore-24-altflip "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.alternate_flip=true $small9"
[[ -n ${stopped:-} ]] && failed=1
if [[ "$(realpath -m "$OUT")" != "$(realpath -m bench/results)" ]]; then  # a few files back instead of up to 12
  results=(gpu.txt gpu.log) state=()
  for f in "$OUT"/gpu-*.json; do [[ -e "$f" ]] && results+=("${f##*/}"); done
  [[ -d "$STATE" && "$STATE" == .gpu-state ]] && state=(-C "$PWD" .gpu-state)  # improved.yaml's run goes back too
  { tar -czf "$OUT/gpu-results.tar.gz" -C "$OUT" "${results[@]}" "${state[@]}" \
      && (cd "$OUT" && rm -f "${results[@]}") \
      && if (( $(stat -c %s "$OUT/gpu-results.tar.gz") > 15 * 1024 * 1024 )); then  # 16 MiB a file comes back
        split -b 15M -d -a 1 "$OUT/gpu-results.tar.gz" "$OUT/gpu-results.tar.gz.part" && rm "$OUT/gpu-results.tar.gz"
      fi; } || failed=1
fi
exit $failed
