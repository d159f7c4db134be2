#!/usr/bin/env bash
# The one prepared GPU check, for a GPU machine that has JAX with CUDA (and numpy, pyyaml, pillow)
# but no TensorFlow, Keras, MLflow or internet. Through pipeline.fitting (the training code) on the JAX
# backend it measures, most important first, each stage under its own time limit so that one slow
# stage cannot take the others' results with it:
#   1. params/fast.yaml, its whole schedule on the real images: fit seconds and test_acc (all 10,000);
#   1b. fast-warm: the same again, its programs loaded from JAX's compilation cache that stage 1 filled: the fit's
#      seconds without its ~25 s of compiling, as a machine that has run it before trains it (the way airbench
#      times its runs, after a warm-up run);
#   1c. reference-airbench94: the published recipe that reaches 94% on the official CIFAR-10 (airbench94, 94.01%
#      over 1,000 runs), PyPI's airbench unchanged in the image's PyTorch, on the same JPEG copy: one untimed run, then
#      3 timed, each scored on every test image (bench.airbench_reference): whether 0.94 is in reach on this data;
#   2. reference-airbench96: airbench's largest recipe (96.05% there), one run: whether a known recipe reaches 0.94 on
#      the JPEG copy at all, and in how long. The two answer what explore-ceiling (fast.yaml at twice its widths for
#      40 epochs, now among the last questions) asked: whether 0.94 is in reach here at all;
#   3. the seed recipe (params/default.yaml): seconds per epoch, projected 150 epochs;
#   4. params/improved.yaml (ResNet-164 with the tricks) for IMPROVED_LIMIT (200 s): seconds per epoch and the
#      projected 150 epochs. Its whole run (~14 minutes of one GPU with its compile, bench/results/gpu.md)
#      outlasts one call (10 minutes at most) and, with a second call's compile and the machine's start, the
#      GPU time the machine gives in all (15 minutes); it stops cleanly at an epoch's end with its training saved in
#      .gpu-state/improved (bench.gpu_epoch --checkpoint), which comes back packed with the results, and a later
#      call carrying .gpu-state goes on from it (GPU_SH_STAGES="improved" gives it the rest of a call). Once
#      whole, its result is kept in .gpu-state/improved.json (carried) and later calls skip it (remove that file
#      to train it again). A checkpoint of other settings is refused by name and the call goes on with the next
#      stages;
#   5. fast.yaml's next questions, whole schedules with test_acc, most telling first (explore-ceiling first), as
#      long as time is left.
# The data is decoded once, before the stages, into a folder of the call's own that each stage reads (--decoded).
# GPU_SH_STAGES="improved" (names separated by spaces) runs only those stages: a second call on the machine, with
# GPU_SH_BUDGET set to its time limit (or the GPU time left, if less) less 10: a call the machine ends before
# the script packs its files brings the training of that call back to no one (its loose files come back, at most 8,
# and bench.gpu_report --unpack takes them; its table says `not run` of each stage gpu.log names without a file).
# Measured 2026-12-04 on one H200 (bench/results/gpu.md): fast.yaml at 16 epochs test_acc 0.9058, at 24 0.9100, at
# 24 with cutout 8 0.9123 (now the file: 7.4 s of epochs after a 24.8 s compiling first one), at 40 0.9131 (val_acc
# flat, 0.906-0.908, over its last three epochs): on the JPEG copy this ResNet-9 stops near 0.91, short of 0.94 at
# any length tried. 16 epochs with ghost batch norm and train.drop_remainder: 0.9099 vs 0.9058, and a first epoch of
# 11.9 s instead of 23.5 s: whole batches only spare XLA a second compile for the last, partial one. improved.yaml:
# 4.63 s per epoch after a first of 100 s.
# The next questions about fast.yaml, in the order asked: the file at 1.5x the width (2.2x the computation: what
# capacity costs in seconds), ghost batch norm at 24 epochs, a second train.seed (the spread of one measurement),
# weight EMA with its BN statistics recomputed (train.ema_bn_batches; in the 5-epoch quarter-width CPU proxy,
# bench/results/fast-cpu.md, level with the raw weights: 0.849 vs 0.847, 0.832 without), 32 epochs, drop_remainder
# alone (does it halve the compile?), and alternating flips at 24 (at 16: 0.9063 vs 0.9058). Every whole schedule
# also records val_acc and test_acc with each test-time augmentation (none, flip,
# flip_shift; bench.gpu_epoch's tta_scores).
#      On 2026-12-04 fast took 49 s of the call, two epochs of improved 114 s, each explore stage ~50 s; the seed
#      stage ~90 s on 2026-11-30.
#
# Here, once: the wheels that machine lacks (keras and the two it needs beyond that image, whose python3 was 3.12;
# optree is built for one CPython, so also for the ones beside it: pip there picks the one that fits), 3.8 MB,
# airbench's source (12 kB; the reference stage unpacks it, nothing installs it), and the JPEG copy of CIFAR-10
# (20 MB), all ignored by git:
#   for v in 3.12 3.11 3.13; do pip download -q --no-deps --only-binary=:all: --python-version $v --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl keras==3.15.1 namex optree==0.20.0; done
#   pip download -q --no-deps airbench==0.1.8 -d .whl
#   mkdir -p .data && cp ../shared/datasets/cifar10-jpeg-q75.tar.gz .data/
# It installs keras from .whl unless the machine's Python has that very version, and namex and optree where it lacks
# them; a misspelt GPU_SH_STAGES, a budget or limit (GPU_SH_BUDGET, FAST_LIMIT, ...) that is no whole number, wheels
# that fit no Python there, or a keras that does not import with its JAX end the call at once with one line saying so
# (in gpu.log, packed as below; the first two before anything runs, on stderr).
# Then on the GPU machine, with .whl, .data and .gpu-state copied beside the checkout: `bash bench/gpu.sh`, within a
# 580 s limit. That machine returns at most 8 files of 16 MiB, so with OUT set elsewhere than bench/results the
# script ends by packing its files (gpu-*.json, gpu.txt, gpu.log, and .gpu-state: improved's training or result) into
# $OUT/gpu-results.tar.gz, cut into 15 MiB pieces (.part0, .part1, ...; from 11 pieces on .part00, .part01, ...;
# GPU_SH_PIECE_MIB sets their size) where it is larger; here, then:
#   python -m bench.gpu_report --unpack PATH/gpu-results.tar.gz   (extracts the results into bench/results and
#   .gpu-state into the checkout, replacing the one carried, and writes gpu.md)
#
# Each stage compiles into a JAX compilation cache of its own (a folder of the call's, under $TMPDIR, removed at its
# end), so that its first epoch and fit seconds include its compiling as fast's do; only fast-warm loads programs,
# fast's (its gpu-*.json says how many: `compile_cache_programs`; its first epoch is short by about
# `compile_seconds_saved`). Shared, every explore stage of fast.yaml's model loaded some of fast's (those its schedule
# leaves the same: in the CPU rehearsal weight initialisers and a train step), and explore-drop's first epoch, the
# question of whether whole batches halve the compile, was short for that alone. improved keeps its own cache in
# .gpu-state/jax, carried with its unfinished training (while the checkout, .whl, .data and .gpu-state stay within
# the 64 MiB a call sends; GPU_SH_CARRY_MIB): a later call on the same kind of GPU that goes on from it loads its
# programs instead of compiling them for ~100 s (each call's count: `parts` of its JSON).
#
# A CPU rehearsal at toy scale (synthetic images, tiny widths, 2 epochs), for any machine with JAX:
#   GPU_SH_SMOKE=1 OUT=/tmp/gpu-smoke bash bench/gpu.sh
set -uo pipefail
OUT=${OUT:-bench/results}
DATA=${DATA:-.data/cifar10-jpeg-q75.tar.gz}
PY=${PYTHON:-python3}
SITE=${GPU_SH_SITE:-/tmp/gpu-site}  # where the wheels go (emptied first: a warm machine keeps an earlier call's)
STAGES="fast fast-warm reference-airbench94 reference-airbench96 seed improved explore-ceiling explore-wide
  explore-24-ghost explore-seed1 explore-ema explore-32 explore-drop explore-24-altflip"
# one space between names: names on several lines, or tabs, passed the check below and then matched no stage
GPU_SH_STAGES=$(tr -s '[:space:]' ' ' <<< "${GPU_SH_STAGES:-}") GPU_SH_STAGES=${GPU_SH_STAGES# }
GPU_SH_STAGES=${GPU_SH_STAGES% }
for name in ${GPU_SH_STAGES:-}; do  # a misspelt name would run nothing and waste the call
  [[ " ${STAGES//$'\n'/ } " == *" $name "* ]] \
    || { echo "GPU_SH_STAGES: no stage '$name' (stages: $(echo $STAGES))" >&2; exit 2; }
done
for var in GPU_SH_BUDGET GPU_SH_CARRY_MIB GPU_SH_PIECE_MIB FAST_LIMIT WARM_LIMIT REFERENCE_LIMIT REFERENCE96_LIMIT \
  SEED_LIMIT IMPROVED_LIMIT CEILING_LIMIT EXPLORE_LIMIT; do  # seconds (MiB): another value fails every check of
  # the time left, and each stage runs whatever the budget (0: timeout's none), until the script dies before packing
  [[ -z ${!var+set} || ${!var} =~ ^[1-9][0-9]*$ ]] || { echo "$var: a whole number from 1, got '${!var}'" >&2; exit 2; }
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
# what code measured: the checkout's source files, hashed as `bench.gpu_report --unpack` hashes its own, which refuses
# results of other code (`source_hash`)
echo "source $(find pipeline bench params -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.sh' \) \
  -not -path '*/__pycache__/*' -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 -r sha256sum | sha256sum | cut -c1-16)" \
  | tee -a "$OUT/gpu.txt"

# Each key once in an overrides string (pipeline.config refuses one given twice, where the last would win unseen):
# the smoke's toy scale replaces, not follows, a stage's own widths and epochs (wide9, long9, ceiling9)
source_args=(--data "$DATA") small9="" small164="" ghost_batch="" short164=""
wide9="model.widths=[64,192,384,768]" long9="train.epochs=32" ceiling9="model.widths=[64,256,512,1024] train.epochs=40"
if [[ -n "${GPU_SH_SMOKE:-}" ]]; then
  source_args=(--images 512) small9="train.epochs=2 model.widths=[8,16,32,64]"
  wide9="train.epochs=2 model.widths=[8,24,48,96]" long9="train.epochs=3 model.widths=[8,16,32,64]"
  ceiling9="train.epochs=2 model.widths=[8,32,64,128]"
  ghost_batch="train.batch_size=64"  # 501 training images make no whole batch of 512
  small164="model.units_per_stage=1 model.widths=[16,32,64]" short164="train.epochs=3"
  STATE=${GPU_SH_STATE:-$OUT/state-smoke}  # never the checkout's own
fi
STATE=${STATE:-${GPU_SH_STATE:-.gpu-state}}  # improved.yaml's training between calls
# The stages' JAX compilation caches: a folder of the call's own, removed at its end, one subfolder per stage (fast-warm
# shares fast's). pipeline's (~/.cache) outlives the call on a machine kept warm, and a later call's fast stage loaded
# the programs an earlier one compiled: fast timed without its compiling, and fast-warm no different from it. One set
# in the environment is used as it is, by every stage (empty: off); improved keeps its own in $STATE/jax.
trap 'rm -rf ${stage_cache:+"$stage_cache"} ${decoded:+"$decoded"}' EXIT  # the call's folders (below), at its end
if [[ -z ${JAX_COMPILATION_CACHE_DIR+set} ]] && stage_cache=$(mktemp -d "${TMPDIR:-/tmp}/gpu-jax.XXXXXX"); then
  export JAX_COMPILATION_CACHE_DIR=$stage_cache
fi
# The data decoded once for every stage, into a folder of the call's own: each stage decoding the JPEG copy itself
# took ~14 s of its limit (2-core AMD EPYC), some 3 minutes of a call of 14 stages. The stages still name $DATA in
# their records (and improved's checkpoint its identity); where the decode fails, each stage decodes $DATA itself.
if [[ -z ${stopped:-} && -z "${GPU_SH_SMOKE:-}" && -f "$DATA" ]] && decoded=$(mktemp -d "${TMPDIR:-/tmp}/gpu-data.XXXXXX")
then
  "$PY" -c "import sys; from pipeline import data; data.load_source(sys.argv[1]).save(sys.argv[2])" \
    "$DATA" "$decoded/data.npz" 2>&1 | tee -a "$LOG"
  if (( PIPESTATUS[0] == 0 )) && [[ -f "$decoded/data.npz" ]]; then
    source_args+=(--decoded "$decoded/data.npz")
    echo "== $DATA decoded once for every stage in ${SECONDS}s of the call" | tee -a "$LOG"
  else
    echo "== $DATA not decoded once (above): each stage decodes it itself" | tee -a "$LOG"
  fi
fi

failed=0 budget=${GPU_SH_BUDGET:-570}  # the call's own limit (run's timeout_s) less a margin
CARRY_MIB=${GPU_SH_CARRY_MIB:-64}  # what the GPU machine takes with a call in all (checkout, .whl, .data, .gpu-state)
sent_bytes() {  # what the next call sends: the checkout's files that git does not ignore, and the carried .whl, .data
  # and $STATE; where git does not know the checkout (the machine's copy), all of it but .git and __pycache__
  local tree="" path size
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
    for path in .whl .data "$STATE"; do  # a link counts as itself: it is copied as a link
      [[ -e "$path" || -L "$path" ]] || continue
      size=$(du -sb "$path" 2>/dev/null | cut -f1)
      tree=$(( ${tree:-0} + ${size:-0} ))
    done
  else
    tree=$(du -sb --exclude=.git --exclude=__pycache__ . 2>/dev/null | cut -f1)
  fi
  echo "${tree:-0}"
}
stage() {  # stage NAME SECONDS ARGS...: one bench.gpu_epoch run (or $module's), its console in gpu.log; skipped
  # without the time, or where $unmet says what the machine lacks for it
  local name=$1 limit=$2; shift 2
  if [[ -n "${GPU_SH_STAGES:-}" && " $GPU_SH_STAGES " != *" $name "* || -n ${stopped:-} ]]; then
    return
  fi
  if [[ -n ${unmet:-} ]]; then
    echo "== $name skipped: $unmet" | tee -a "$LOG"
    return
  fi
  if (( SECONDS + limit > budget )); then
    echo "== $name skipped: ${SECONDS}s of ${budget}s used, it may take ${limit}s" | tee -a "$LOG"
    return
  fi
  echo "== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
  local cache=()  # the stage's own folder of the call's cache (fast-warm: fast's); one set otherwise, as it is
  [[ -n ${stage_cache:-} && ${JAX_COMPILATION_CACHE_DIR-} == "$stage_cache" ]] \
    && cache=(env "JAX_COMPILATION_CACHE_DIR=$stage_cache/${name%-warm}")
  "${cache[@]}" timeout --signal=INT --kill-after=10 "$limit" "$PY" -m "${module:-bench.gpu_epoch}" "${source_args[@]}" \
    --out "$OUT/gpu-$name.json" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name exit $rc $(date -u +%T)" | tee -a "$LOG"
  [[ $rc == 0 ]] && passed+=" $name " || { failed=1 failures+=" $name "; }
}
passed="" failures=""
stage fast "${FAST_LIMIT:-220}" --full --params params/fast.yaml --overrides "train.feed=device $small9"
# the same command again: every program it runs loaded from the cache the fast stage filled (its JSON's
# compile_cache_programs says how many), so its fit is what a second run of fast.yaml on this machine takes
stage fast-warm "${WARM_LIMIT:-90}" --full --params params/fast.yaml --overrides "train.feed=device $small9"
# The reference: airbench94 (94.01% on the official CIFAR-10), PyPI's airbench unchanged, in PyTorch, trained and
# scored on the same data: is 0.94 in reach of a known 94% recipe on the JPEG copy at all? 1 untimed run, then 3 timed
reference=$(compgen -G ".whl/airbench-*.tar.gz" | head -1) lacks=""  # (stage's $unmet: for this one alone)
if [[ -z $reference ]]; then
  lacks="no .whl/airbench-*.tar.gz (pip download --no-deps airbench==0.1.8 -d .whl)"
elif ! "$PY" -c "import sys, torch, torchvision; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
  lacks="$("$PY" -V 2>&1) has no PyTorch and torchvision with a CUDA GPU"
fi
unmet=$lacks module=bench.airbench_reference stage reference-airbench94 "${REFERENCE_LIMIT:-120}" \
  --package "$reference" --recipe 94 --runs 3
# Where airbench94 falls short of 0.94 on the JPEG copy, does its largest recipe reach it (airbench96: 96.05% on the
# official CIFAR-10, 40 epochs of wider blocks, ~20x airbench94's computation)? One run, its seconds cold
unmet=$lacks module=bench.airbench_reference stage reference-airbench96 "${REFERENCE96_LIMIT:-150}" \
  --package "$reference" --recipe 96 --runs 0
stage seed "${SEED_LIMIT:-150}" --epochs 2 --params params/default.yaml \
  --overrides "train.feed=device train.steps_per_execution=8 $small164"
# improved.yaml: its first epochs, for the seconds per epoch and the projected 150 epochs (~14 min of one GPU with
# its compile: over two calls, the second loading the first's compiled programs where they fit in what a call
# carries, and with the machine's start, more than the 15 minutes of GPU time in all; and .gpu-state does not
# outlive the checkout), within
# IMPROVED_LIMIT; named in GPU_SH_STAGES it has the rest of the call instead. It stops at an epoch's end 60 s
# before its limit, for the scoring after its last epoch (its predict compiles), its training saved in
# .gpu-state/improved, from which the next call goes on (carry ".gpu-state").
left=$(( budget - SECONDS - 20 ))  # the rest of the call less a margin for packing
[[ " ${GPU_SH_STAGES:-} " == *" improved "* ]] || left=$(( left < ${IMPROVED_LIMIT:-200} ? left : ${IMPROVED_LIMIT:-200} ))
if [[ -n ${stopped:-} || ( -n "${GPU_SH_STAGES:-}" && " $GPU_SH_STAGES " != *" improved "* ) ]]; then
  :
elif [[ -f "$STATE/improved.json" ]]; then  # trained whole by earlier calls: not begun afresh
  echo "== improved skipped: whole in an earlier call ($STATE/improved.json; remove it to train it again)" \
    | tee -a "$LOG"
elif (( left >= 150 )); then  # its first epoch compiles for ~100 s (less where $STATE/jax holds its programs)
  # Its compiled programs go with its training, in JAX's compilation cache at $STATE/jax: a call that goes on from it
  # on the same kind of GPU loads them instead of compiling again (another kind, or another JAX, compiles afresh)
  JAX_COMPILATION_CACHE_DIR="$STATE/jax" stage improved "$left" --full --params params/improved.yaml \
    --checkpoint "$STATE/improved" --stop-after "$(( left - 60 ))" \
    --overrides "train.feed=device train.steps_per_execution=8 $small164 $short164"
  if [[ "$passed" == *" improved "* && ! -d "$STATE/improved" ]]; then  # whole and scored
    mkdir -p "$STATE" && cp "$OUT/gpu-improved.json" "$STATE/improved.json"
  elif [[ "$passed" == *" improved "* ]]; then
    echo "== improved stopped within its ${left}s: seconds per epoch and the projected 150 epochs in" \
      "gpu-improved.json; its training in $STATE/improved, for a later call to go on from" | tee -a "$LOG"
  fi
  if [[ ! -d "$STATE/improved" ]]; then  # nothing left to go on from
    rm -rf "$STATE/jax"
  elif [[ -d "$STATE/jax" ]]; then  # kept only where the next call can still carry it with the rest
    carried=$(sent_bytes) programs=$(du -sb "$STATE/jax" 2>/dev/null | cut -f1)
    if (( carried > (CARRY_MIB - 1) * 1024 * 1024 )); then
      echo "== improved's compiled programs not kept ($(( ${programs:-0} / 1024 / 1024 )) MiB): with the checkout," \
        ".whl, .data and $STATE, $(( carried / 1024 / 1024 )) MiB, over the ${CARRY_MIB} MiB a call" \
        "carries; the next call compiles them again" | tee -a "$LOG"
      rm -rf "$STATE/jax"
    fi
  fi
else
  echo "== improved skipped: ${left}s left of the call" | tee -a "$LOG"
fi
# fast.yaml's next questions, most telling first, for as long as the call leaves time. Does capacity lift its plateau
# near 0.91 on the JPEG copy (0.9131 at 40 epochs)? Its widths doubled (4x the computation), 40 epochs: if even that
# stays well short of 0.94, no ResNet-9 reaches it here in 10 s.
stage explore-ceiling "${CEILING_LIMIT:-150}" --full --params params/fast.yaml \
  --overrides "train.feed=device $ceiling9"
stage explore-wide "${EXPLORE_LIMIT:-100}" --full --params params/fast.yaml \
  --overrides "train.feed=device $wide9"
stage explore-24-ghost "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device model.ghost_batch=32 train.drop_remainder=true $small9 $ghost_batch"
stage explore-seed1 "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.seed=1 $small9"
stage explore-ema "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.ema=true $small9"
stage explore-32 "${EXPLORE_LIMIT:-80}" --full --params params/fast.yaml \
  --overrides "train.feed=device $long9"
stage explore-drop "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.drop_remainder=true $small9 $ghost_batch"
stage explore-24-altflip "${EXPLORE_LIMIT:-75}" --full --params params/fast.yaml \
  --overrides "train.feed=device train.alternate_flip=true $small9"
[[ -n ${stopped:-} ]] && failed=1
if [[ "$(realpath -m "$OUT")" != "$(realpath -m bench/results)" ]]; then  # a few files back instead of up to 12
  results=(gpu.txt gpu.log) state=()
  for f in "$OUT"/gpu-*.json; do [[ -e "$f" ]] && results+=("${f##*/}"); done
  [[ -d "$STATE" && "$STATE" == .gpu-state ]] && state=(-C "$PWD" .gpu-state)  # improved.yaml's run goes back too
  { tar -czf "$OUT/gpu-results.tar.gz" -C "$OUT" "${results[@]}" "${state[@]}" \
      && (cd "$OUT" && rm -f "${results[@]}") \
      && size=$(stat -c %s "$OUT/gpu-results.tar.gz") piece=$(( ${GPU_SH_PIECE_MIB:-15} * 1024 * 1024 )) \
      && if (( size > piece )); then  # 16 MiB a file comes back
        # numbered with as many digits as the last piece's number takes (.part0 to .part9, then .part00, ...): one
        # digit stopped split at the 11th piece, the call failed with the whole archive left beside ten pieces
        last=$(( (size - 1) / piece ))
        split -b "$piece" -d -a "${#last}" "$OUT/gpu-results.tar.gz" "$OUT/gpu-results.tar.gz.part" \
          && rm "$OUT/gpu-results.tar.gz" && echo "== gpu-results.tar.gz cut into $(( last + 1 )) pieces"
      fi; } || failed=1
fi
exit $failed
