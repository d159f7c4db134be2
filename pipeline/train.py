"""Step 2, train: fit the ResNet on a prepared dataset and log it.

Reads:  a prepared dataset URI (from prepare; prepared on the spot, or reused, if not given).
Writes: params (every resolved value, once); per-epoch metrics `loss`, `acc`, `val_loss`,
        `val_acc`, `lr`, `iterations`, `epoch_seconds`, `images_per_second` with step = epoch (1-based);
        metric `wall_seconds` (the seconds train spent on the run, summed over its sessions: a resumed or extended
        run's counts no time between them), logged at each epoch's end and the session's;
        tags such as `devices` (this host's), `replicas` (over every host), `val_data_sha256` (the images
        val_acc is measured on: the test split's with train.validation_fraction 0) and `inert_params` (the params
        without effect given the others, `config.inert_params`: a warning names each set away from default.yaml's
        value); metric `val_images_in_train`
        (how many of those have the same pixels as an image the model trains on; a warning where any do:
        val_acc then overstates); artifacts `history.csv`,
        `curves.png` (acc/val_acc, the seed's plot), `config.json`;
        the model (a pyfunc around the Keras model, see pipeline.serve: no enforcing signature,
        a uint8 input example; its MLmodel metadata says how to call it and how it was trained:
        the input formats and shape, the arch, EMA weights or not, the served test-time augmentation, this run and
        its params, see `tracking.training.log_model`).
Returns the logged model's URI (`models:/m-...`).

Its inputs are checked and resolved by `pipeline.inputs`, as `main`'s are. Completed epochs are
checkpointed per run and resumed by the same command (`pipeline.tracking.resume`), in the backend, precision and XLA
choice the run recorded in tags `backend`, `dtype_policy` and `jit_compile` (`recorded_fast_path`); a cluster's other
hosts train in lock step without logging (`run_worker`), in the chief's precision and XLA choice (`Distribution.agree`).
What a train run records (params, tags, per-epoch metrics, the model) is written by `pipeline.tracking.training`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from pipeline import config, data, prepare
from pipeline.data import Dataset, arrays_digest, test_images_in_train
from pipeline.distribute import TRAINED, Distribution, cluster_from_env, distribution, run_key
from pipeline.inputs import (
    check_inputs,
    check_known_batches,
    go_on_with_backend,
    refuse_unusable_backend,
    resolve_inputs,
)
from pipeline.tracking import (
    INERT_PARAMS_TAG,
    VAL_DATA_TAG,
    StepFailed,
    active_run_id,
    artifact_dir,
    checkpoint_root,
    cli,
    json_digest,
    log_constants,
    log_metrics,
    set_tags,
    step_run,
)
from pipeline.tracking.resume import (
    TRAIN_CODE,
    check_checkpoint_root,
    checkpoint_dir,
    log_train_params,
    recorded_training,
    release,
    resumable_run,
    train_code,
    training_ended,
)

if __name__ == "__main__":  # a backend Keras cannot load: one line, exit 2, before the imports below load it
    refuse_unusable_backend()

import keras  # noqa: E402

from pipeline import fitting  # noqa: E402
from pipeline.fitting import (  # noqa: E402
    Checkpoint,
    check_backend,
    check_replica_batches,
    compile_model,
    cpu_allocator,
    diverged,
    fit,
    held_out_split,
    images_per_epoch,
    inference_copy,
    training_part,
)
from pipeline.tracking.training import (  # noqa: E402
    MlflowEpochLogger,
    SessionClock,
    log_trained_model,
    logged_epochs,
    logged_history,
    start_training,
    trained_with,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend
from matplotlib.ticker import MaxNLocator  # noqa: E402


class TrainingDiverged(StepFailed):
    """The loss became NaN or infinite."""


def plot_curves(history: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["acc"], label="acc")
    if "val_acc" in history:
        ax.plot(history["epoch"], history["val_acc"], label="val_acc")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: config.Config, dataset_uri: str, dist: Distribution | None = None,
        extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> str:
    """Train inside the active run; return the logged model's URI. dist: see `distribute.distribution`
    (made from `train.distribute` if None); in a cluster this is the chief's part. `extra_callbacks`
    run after the per-epoch logging and checkpoint (a sweep's pruning callback).

    The seconds this session spends, from here to its end (or to each epoch's end), are added to those of the run's
    earlier sessions in metric `wall_seconds` (`SessionClock`): compare's wall_s. A session that fails, is stopped
    (Ctrl-C, SIGTERM) or pruned logs its total too, once it has claimed the run and unless the tracking store is what
    failed."""
    clock = SessionClock(active_run_id())
    try:
        return train_session(cfg, dataset_uri, dist, extra_callbacks, clock)
    except BaseException as exc:
        clock.log_after(exc)
        raise


def train_session(cfg: config.Config, dataset_uri: str, dist: Distribution | None,
                  extra_callbacks: Sequence[keras.callbacks.Callback], clock: SessionClock) -> str:
    """`run`'s training, timed by `clock`: logs its total once the model is logged."""
    t = cfg.train
    for line in config.inert_warnings(cfg):  # at the session's start: a sweep's trial may draw such a combination
        print(line, file=sys.stderr, flush=True)
    recorded = recorded_fast_path(active_run_id())  # a resumed run's: before anything is logged, the backend's refusal
    dist = dist or distribution(t.distribute)  # first: a multi-worker strategy must precede every TF op
    # Before any refusal below (the replicas' batches, the hosts' `agree`): a run refused there ends FAILED with its
    # reason and the params that say what it was (`start_training`'s tags and config.json follow once it trains)
    log_train_params(cfg, dataset_uri)
    dataset = prepare.load_dataset(dataset_uri)
    splits = held_out_split(dataset, t)
    check_replica_batches(cfg, dist, splits)
    agreed = None
    if dist.cluster:  # before the model is built (see `agree`); hashing the data takes a moment: a cluster's only
        agreed = dist.agree(training_job(cfg, dataset), Checkpoint.completed_epochs(checkpoint_dir(active_run_id())),
                            fitting.planned_fast_path(t, dist, recorded), run_key(active_run_id()))[1]
    train_images = len(splits[0])
    model = compile_model(cfg, training_part(dataset, splits), dist, train_images, recorded, agreed)

    run_id = start_training(cfg, dataset_uri, {
        "backend": keras.backend.backend(), "devices": ", ".join(dist.devices),
        "dtype_policy": model.dtype_policy.name, "jit_compile": str(bool(model.jit_compile)).lower(),
        "cpu_allocator": cpu_allocator(), "hardware": fitting.hardware(), "compile_cache": fitting.compile_cache(),
        "distribute": dist.mode, "workers": str(dist.workers),
        "replicas": str(dist.replicas),  # of every host: `devices` names this host's only (multi_worker)
        "trainable_params": str(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
        # what val_acc is measured on: compare tells runs validated on other images (or on the test split) apart
        VAL_DATA_TAG: arrays_digest(splits[2:], dataset.class_names),
        INERT_PARAMS_TAG: json.dumps(config.inert_params(cfg)),  # every one, default or not: compare reads them
        **fitting.schedule_tags(t, train_images),  # what train.lr, train.warmup, train.lr_boundaries resolve to
        **({"cpu_fast_path_probe": json.dumps(fitting.PROBED)} if fitting.PROBED else {})}, dataset)
    log_constants({"train_images": train_images, "val_images": len(splits[2])})  # held out (or the test split's)
    log_val_images_in_train(splits, t.validation_fraction)
    print(f"training {model.name} ({model.count_params():,} params) on {train_images} images, "
          f"backend {keras.backend.backend()}, {dist.mode} over {dist.workers} host(s), devices {dist.devices}")

    # Order matters: metrics are logged before the checkpoint is written, so a kill between the
    # two re-runs that epoch on resume and its already-logged step is skipped (no gap, no duplicate).
    logged = logged_epochs(run_id)
    # The checkpoint outlives `fit` until the model is logged (the largest upload): a kill or a tracking server
    # lost in between leaves the trained weights for the rerun, which logs them without training again. In a
    # cluster it goes when `fit` ends, as every worker's does (their epochs must agree on a rerun).
    history = fit(model, cfg, splits, len(dataset.class_names),
                  [MlflowEpochLogger(images_per_epoch(t, train_images), logged),
                   Checkpoint(checkpoint_dir(run_id), t.checkpoint_every, keep=not dist.cluster),
                   clock, *extra_callbacks])
    dist.end()
    reason = diverged(history)
    if reason:
        shutil.rmtree(checkpoint_dir(run_id), ignore_errors=True)  # resuming a diverged run would diverge again
        lr = f"{t.lr:g}" + (f": {t.scaled_lr:g} at batch {t.batch_size} by train.lr_scaling linear"
                            if t.scaled_lr != t.lr else "")  # the value given, then the one trained with
        reason += f"; nothing was registered. Lower train.lr (now {lr}) or check the data"
        set_tags({"failure_reason": reason})
        raise TrainingDiverged(reason)

    log_compile_cache_loads()
    history = logged_history(run_id)
    served = inference_copy(cfg, training_part(dataset, splits), model)
    with artifact_dir() as folder:
        history.to_csv(folder / "history.csv", index=False)
        plot_curves(history, folder / "curves.png")
    model_uri = log_trained_model(run_id, served, list(dataset.class_names), dataset.x_test[:2],
                                  cfg.evaluate.tta, cfg.train.shift_fill, trained_with(cfg, run_id))
    shutil.rmtree(checkpoint_dir(run_id), ignore_errors=True)
    clock.log()  # the session's end: before the claim goes, as nothing may be logged once another command resumes
    # Held until the model is logged: else a second identical command could resume this run. A run that fails
    # (SIGTERM too) keeps it until it has ended (`tracking.open_run`): released first, an identical command started
    # meanwhile resumed it, then it was ended KILLED under that command
    release(run_id)
    training_ended(run_id)
    print(f"logged model {model_uri}")
    return model_uri


def recorded_fast_path(run_id: str) -> fitting.Recorded | None:
    """The precision and XLA choice train run `run_id` trained its epochs with, for a resumed run to go on with
    (`compile_model`); None for a run that has trained none (its tags `dtype_policy`, `jit_compile` not set yet).
    ConfigError if it trained on another backend than this process's (`inputs.check_resumed_machine` refuses that
    before any run opens, or has this process load the run's; here for a run resumed by another command meanwhile)."""
    backend, precision, jit, source = recorded_training(run_id)
    if backend:
        go_on_with_backend(backend, source)  # Keras is loaded here: refused unless it runs `backend`
    return fitting.Recorded(precision, jit, f"{source} (tags dtype_policy, jit_compile)") if precision and (
        jit is not None) else None


def log_compile_cache_loads() -> None:
    """On JAX, log what its persistent compilation cache spared the training (`fitting.compile_cache_loaded`): metrics
    `compile_cache_programs` and `compile_seconds_saved` (the first epoch's `epoch_seconds` is that much shorter than
    a first run's), and say it on the console where it spared any."""
    folder = fitting.compile_cache()
    if folder == "n/a":
        return
    programs, saved = fitting.compile_cache_loaded()
    log_metrics({"compile_cache_programs": programs, "compile_seconds_saved": round(saved, 2)})
    if programs:
        print(f"{programs} compiled program(s) loaded from {folder}: {saved:.1f} s of compiling "
              f"spared (JAX_COMPILATION_CACHE_DIR)", flush=True)


def log_val_images_in_train(splits: tuple, validation_fraction: float) -> int:
    """Log metric `val_images_in_train`: how many of the images val_acc is measured on (`split_validation`'s) have
    the same pixels as an image the model trains on; say so on stderr where any do. Returns the count."""
    x_train, _, x_val, _ = splits
    count = test_images_in_train(x_train, x_val)
    log_constants({"val_images_in_train": count})
    if count:
        held_out = ("held-out training images" if validation_fraction
                    else "test images (train.validation_fraction 0)")
        print(f"warning: {count} of the {len(x_val)} {held_out} val_acc is measured on are also images the model "
              "trains on (the same pixels): val_acc scores them as unseen and overstates, and a sweep choosing or "
              "pruning trials by it is misled", file=sys.stderr, flush=True)
    return count


def training_job(cfg: config.Config, dataset: Dataset) -> dict[str, str]:
    """Digests of what every host of a cluster must share, by what they digest: the model and train params
    (progress display and how they are spread aside), the data, and the training code (`train_code`: a host left
    on other code would train in lock step with it, and the chief would log a model no single code trained).
    Evaluate, register and tracking settings concern the chief only."""
    (params, params_digest), (code, code_digest) = meeting_job(cfg).items()
    return {params: params_digest, "data": dataset.digest(), code: code_digest}


def meeting_job(cfg: config.Config) -> dict[str, str]:
    """`training_job` less the data: what the hosts of a cluster compare as they meet, before any run opens
    (`distribute.wait_for_hosts`); the chief prepares the data only once its runs are open."""
    return {"model or train params": json_digest(shared_params(cfg)),
            f"code (pipeline/{{{','.join(TRAIN_CODE)}}}.py)": train_code()}


MEETING_DATA = "data (data.* params or what data.source holds)"  # `meeting_data`'s part


def meeting_data(cfg: config.Config, dataset_uri: str = "", resume: str = "") -> dict[str, str]:
    """The data's part of what the hosts of a cluster compare as they meet, before any run opens (`meeting_job`), for a
    host that builds its data from `data.source`: a digest of what the source holds (`data.source_digest`: the file's
    or folder's bytes, cifar10's published checksum; not the path it is kept at, which may differ from host to host)
    and of the `data.*` params with an effect on it (`config.inert_params`). A worker on another copy of the archive
    was refused only before training (`Distribution.agree`), once the chief had opened its runs and prepared the data.
    Empty for a host that reads a prepared dataset (`dataset_uri`), for a chief resuming a run by id (`resume`: it
    trains on that run's dataset) and where the source cannot be read (refused once the hosts have met): their data
    is compared before training only."""
    if dataset_uri or resume not in ("", "never"):
        return {}
    try:
        source = data.source_digest(cfg.data.source)
    except data.DataError:
        return {}
    inert = config.inert_params(cfg)
    params = {k: v for k, v in cfg.flat("data").items() if k != "data.source" and k not in inert}
    return {MEETING_DATA: json_digest({"params": params, "source": source})}


def chief_checkpoint(cfg: config.Config, resume: str, dataset_uri: str = "") -> tuple[int, int] | None:
    """The chief's checkpoint as the hosts compare it when they meet, before any run opens (`distribute.
    check_checkpoints`): the epochs held by the checkpoint of the train run it goes on with (resume=<id>'s, or the one
    a plain rerun continues: `resumable_run`) and that run (`run_key`); (0, 0) where it starts afresh. None where that
    is not known yet (its data not found: refused once the hosts have met)."""
    if resume == "never":
        return 0, 0
    try:
        if resume:
            run_id = resume
        else:
            uri = dataset_uri or prepare.find_prepared(prepare.prepare_key(cfg))
            run_id = resumable_run(cfg, uri) if uri else None
        return (Checkpoint.completed_epochs(checkpoint_dir(run_id)), run_key(run_id)) if run_id else (0, 0)
    except Exception:  # noqa: BLE001 - not known here; `check_inputs` says why in one line once the hosts have met
        return None


MEETING = "meeting"  # in a worker's checkpoint folder: the `meeting_key` of the job its epochs belong to


def meeting_key(cfg: config.Config, dataset_uri: str = "") -> str | None:
    """A digest of what a worker's checkpoint folder is keyed by (`worker_checkpoint_dir`) that is known before its data
    is read: the params in that key and the data's `meeting_data`; None without the latter (a dataset URI)."""
    meeting = meeting_data(cfg, dataset_uri)
    return json_digest({"params": shared_params(cfg, "train.epochs", "train.checkpoint_every"), **meeting}) \
        if meeting else None


def worker_checkpoint(cfg: config.Config, task: str, dataset_uri: str = "", resume: str = "") -> tuple[int, int] | None:
    """A non-chief host's checkpoint as the hosts compare it when they meet, before any run opens: the epochs it holds
    and the chief's run they belong to (`recorded_run`), found before the data is read by the `meeting_key` written
    beside them; (0, 0) for none, or with resume never. None where that is not known: a dataset URI given, a folder
    of this task's holding epochs that records no key (an earlier version's), or two recording this one (the data's
    code changed between them): then compared before training only (`Distribution.agree`)."""
    key = meeting_key(cfg, dataset_uri)
    if key is None:
        return None
    if resume == "never":
        return 0, 0
    found = []
    for folder in checkpoint_root().glob(f"{task.replace(' ', '')}-*"):
        try:
            recorded = (folder / MEETING).read_text()
        except OSError:
            if Checkpoint.completed_epochs(folder):
                return None
            continue
        if recorded == key:
            found.append(folder)
    if len(found) > 1:
        return None
    return (Checkpoint.completed_epochs(found[0]), recorded_run(found[0])) if found else (0, 0)


def shared_params(cfg: config.Config, *leave_out: str) -> dict[str, str]:
    """The model and train params every host of a cluster must share (`training_job`), but `leave_out`."""
    return {k: v for k, v in cfg.flat().items() if k.startswith(("model.", "train."))
            and k not in ("train.verbose", "train.distribute", *leave_out)}


def run_worker(cfg: config.Config, dataset_uri: str, dist: Distribution, resume: str = "") -> None:
    """A non-chief host of a cluster: train in lock step with the chief, log nothing to MLflow.

    The dataset comes from `dataset_uri` if given (read-only), else it is built from `data.*`
    exactly as the chief's prepare step builds it. Completed epochs are checkpointed locally,
    keyed by `training_job`, so rerunning every host's command resumes.
    """
    dataset = prepare.load_dataset(dataset_uri) if dataset_uri else prepare.build(cfg)
    splits = held_out_split(dataset, cfg.train)
    check_replica_batches(cfg, dist, splits)
    job = training_job(cfg, dataset)
    backup = worker_checkpoint_dir(cfg, job["data"], dist.task)
    if resume == "never":
        shutil.rmtree(backup, ignore_errors=True)
    print(f"{dist.task} of {dist.workers}: training on {len(splits[0])} images, devices {dist.devices}; "
          f"the chief logs to MLflow")
    done, chiefs, run = dist.agree(job, Checkpoint.completed_epochs(backup), fitting.planned_fast_path(cfg.train, dist),
                                   recorded_run(backup))
    if done == TRAINED:
        print(f"{dist.task}: nothing to train: the chief goes on from the model an identical command trained before "
              f"its pipeline failed (in evaluate or register)")
        return
    backup.mkdir(parents=True, exist_ok=True)  # the chief's run these epochs belong to, for `agree` on a rerun
    (backup / CHIEF_RUN).write_text(str(run))
    if key := meeting_key(cfg, dataset_uri):  # this folder found on a rerun before the data is read
        (backup / MEETING).write_text(key)
    # after `agree` (see there), in the chief's precision and XLA choice: `auto` may resolve otherwise on this host
    model = compile_model(cfg, training_part(dataset, splits), dist, len(splits[0]), chief=chiefs)
    history = fit(model, cfg, splits, len(dataset.class_names),
                  [Checkpoint(backup, cfg.train.checkpoint_every)])
    shutil.rmtree(backup, ignore_errors=True)
    reason = diverged(history)
    if reason:
        raise TrainingDiverged(reason)


def check_worker_resume(resume: str, task: str) -> None:
    """ConfigError for a non-chief host (`task`) started with a `--resume` other than '' or never: it reads no run (the
    chief's `-P resume=<id>` picks the one the cluster goes on with) and goes on from its own checkpoint, so a run id,
    or a misspelt never, was ignored without a word."""
    if resume not in ("", "never"):
        raise config.ConfigError(f"resume: {resume!r} on {task}, which reads no MLflow run: the chief's -P resume "
                                 f"picks the run, and this host goes on from its own checkpoint. Start it with "
                                 f"--resume '' (the default), or --resume never to start afresh as the chief does "
                                 f"with -P resume=never")


CHIEF_RUN = "chief_run"  # in a worker's checkpoint folder: the chief's run its epochs belong to (`run_key`)


def recorded_run(backup: Path) -> int:
    """The chief's run (`run_key`) a worker's checkpoint folder recorded; 0 if none."""
    with contextlib.suppress(OSError, ValueError):
        return int((backup / CHIEF_RUN).read_text())
    return 0


def worker_checkpoint_dir(cfg: config.Config, data_digest: str, task: str) -> Path:
    """Where a non-chief host (`task`, "worker 1") checkpoints its epochs. Keyed by params and data, not code: after
    every host pulled new code, the chief's `resume=<id>` goes on from its checkpoint, and this host's must be found
    too (`agree` checks that the hosts' code is the same). Nor by what a resumed run may change
    (`resume.config_to_resume`): with `train.epochs` in the key, the chief's `resume=<id> epochs=<more>` (extending
    a killed run) found its checkpoint and this host none ("worker 1 0")."""
    params = shared_params(cfg, "train.epochs", "train.checkpoint_every")
    return checkpoint_root() / f"{task.replace(' ', '')}-{json_digest({'params': params, 'data': data_digest})[:16]}"


def skip_training(cfg: config.Config, dataset_uri: str, dist: Distribution) -> None:
    """The chief's part when it goes on from a model trained before (`main`'s `trained_before_a_failure`): the other
    hosts of its cluster, started to train it, learn that there is nothing to (they end at once, exit 0)."""
    dist.agree(training_job(cfg, prepare.load_dataset(dataset_uri)), TRAINED)


def main() -> None:
    parser = config.entry_point_parser("train", __doc__.split("\n")[0], resume=config.RESUME_HELP,
                                       dataset_uri="prepared dataset; default: prepare (or reuse) from --data")
    args = parser.parse_args()
    cfg = config.load_from_cli(args.params, args.overrides, epochs=args.epochs, data=args.data)
    check_backend(cfg)
    # every host checkpoints its epochs there: a cluster's other hosts too, which `check_inputs` does not see, before
    # they meet the others (a worker failing its first checkpoint stopped the cluster after an epoch)
    check_checkpoint_root()
    cluster = cluster_from_env()
    if cluster and not cluster.chief:  # its data, as `check_inputs` the chief's: failing once the hosts had met, it
        # ended the chief's runs FAILED ("worker 1 ended before training began")
        check_worker_resume(args.resume, cluster.task)
        if args.dataset_uri:
            prepare.check_dataset_uri(args.dataset_uri)
        else:
            prepare.check_source(cfg)
    # check_inputs changes no model or train param, nor the data but with a dataset URI or a run resumed by id
    held = None if not cluster else chief_checkpoint(cfg, args.resume, args.dataset_uri) if cluster.chief else \
        worker_checkpoint(cfg, cluster.task, args.dataset_uri, args.resume)
    dist = distribution(cfg.train.distribute, job={**meeting_job(cfg), **meeting_data(cfg, args.dataset_uri,
                                                                                        args.resume)},
                        checkpoint=held)
    if not dist.chief:
        with dist.telling_the_others():  # found at once by the chief, which waits in a collective meanwhile
            run_worker(cfg, args.dataset_uri, dist, args.resume)
        return
    cfg, dataset_uri = check_inputs(cfg, resume=args.resume, dataset_uri=args.dataset_uri)
    check_known_batches(cfg, dist, dataset_uri)  # before prepare's run and the train run
    dataset_uri, resume_id = resolve_inputs(cfg, resume=args.resume, dataset_uri=dataset_uri)
    with step_run(cfg, "train", run_name=cfg.run_name(), resume_run_id=resume_id):
        run(cfg, dataset_uri, dist)


if __name__ == "__main__":
    cli(main, resumable=True)
