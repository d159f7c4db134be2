"""A training command's inputs (data, a dataset URI, a run to resume, the host's place in a cluster),
checked before any run opens, and for `main` before Keras loads, so that a wrong path or run id is refused in
the seconds the interpreter and MLflow take to start, not after TensorFlow's ~12 CPU-s import (the `train`
entry point imports Keras first, to check the backend and its devices). Shared by both entry points; the check of
the Keras backend itself (`check_configured_backend`, `refuse_unusable_backend`) by every entry point that loads Keras.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from pipeline import config, data, prepare
from pipeline.data import CIFAR10_TEST_IMAGES, CIFAR10_TRAIN_IMAGES
from pipeline.distribute import cluster_from_env
from pipeline.tracking import cli
from pipeline.tracking.resume import (
    check_checkpoint_root,
    check_resumable_code,
    config_to_resume,
    find_resumable,
    recorded_training,
    release,
)


def check_inputs(cfg: config.Config, *, resume: str, dataset_uri: str = "") -> tuple[config.Config, str]:
    """Check a training command's inputs before any run opens (ConfigError or DataError naming the key);
    return the params to train with and the dataset URI to train on ("" = prepare or reuse one, see
    `resolve_inputs`).

    A dataset URI given by the command must name a prepare step's artifact, and its `data.*` params replace the
    params file's (a note says which changed), so the run records the data it trains on. resume, a run id: `cfg`
    (and `dataset_uri`) must be what that run started with, and its dataset is used (see `config_to_resume`).
    Without a dataset URI `data.source` must exist (cifar10: in the Keras cache or downloadable now, unless a dataset
    prepared from it is reused), and, where none is reused, be readable: it is read now (`prepare.read_source`).
    resume "": the run a rerun would continue must have been checkpointed by the code here (`check_resumable_code`).
    Either way the run resumed goes on with the backend, precision and XLA choice it trained with
    (`check_resumed_machine`). The checkpoint folder must be writable (`check_checkpoint_root`). The
    backend must support the params, and in a cluster (TF_CONFIG) only the chief runs the steps.
    """
    check_configured_backend()
    check_checkpoint_root()  # each run's lock lives there (another user's folder: one line, not a traceback)
    given = dataset_uri
    if given:
        prepare.check_dataset_uri(given)
        cfg = with_dataset_params(cfg, given)
    # too few to hold out or to batch: refused now, before the data is looked up (a CIFAR-10 download) or prepared
    check_known_training_images(cfg)
    if resume not in ("", "never"):
        dataset_uri = config_to_resume(resume, cfg, given)  # `given` if given (else refused), or the run's; claimed
        try:
            return _checked_rest(cfg, resume, dataset_uri, given)
        except BaseException:  # refused after all: the run is free again (a process of its own frees it as it exits)
            release(resume)
            raise
    return _checked_rest(cfg, resume, dataset_uri, given)


def _checked_rest(cfg: config.Config, resume: str, dataset_uri: str, given: str) -> tuple[config.Config, str]:
    """`check_inputs` once the params and a run to resume by id are known to be good."""
    resumed, fetch, prepared = None, False, None
    if resume not in ("", "never"):
        resumed = resume
        if not given:
            prepare.check_dataset_uri(dataset_uri)
    else:
        if not given:
            prepared = prepare.find_prepared(prepare.prepare_key(cfg))  # a missing data path fails here
            # and, with no dataset prepared to reuse, CIFAR-10 neither in the Keras cache nor downloadable (as
            # prepare.check_source): looked up last, once the params are known to be good (it may download 170 MB)
            fetch = not prepared and cfg.data.source == "cifar10"
        # a path's count, known once a prepare run has read it: the dataset given or reused (each retry of a command
        # these params refuse opened a train run, and left it FAILED)
        check_known_training_images(cfg, given or prepared)
    if not resume:  # a plain rerun: the run it would continue must have been checkpointed by the code here
        resumed = check_resumable_code(cfg, given or prepared)
    if resumed:
        check_resumed_machine(resumed, cfg)
    if config.needs_backend_check(cfg.train):  # only those params load Keras here
        from pipeline.fitting import check_backend

        check_backend(cfg)
    cluster = cluster_from_env()
    if cluster and not cluster.chief:
        raise config.ConfigError(f"TF_CONFIG: this host is {cluster.task}; the pipeline runs on the chief, "
                                 f"here run `python -m pipeline.train` with the chief's params")
    if fetch:
        data.fetch_cifar10()
    # the data prepare reads, refused here if it cannot be; in a cluster read once the hosts have met (prepare's
    # `ensure_prepared`): a chief refused here never came, and its workers waited $PIPELINE_HOSTS_TIMEOUT for it
    if not cluster and not given and not prepared and resume in ("", "never"):
        prepare.read_source(cfg)
    return cfg, dataset_uri


def check_resumed_machine(run_id: str, cfg: config.Config) -> None:
    """Before any run opens: train run `run_id`, which the command resumes, goes on with the backend, precision and XLA
    choice it trained with (`resume.recorded_training`; `auto` and KERAS_BACKEND are each machine's own), or is
    refused with a ConfigError naming the key and both values.

    The backend: where Keras is not loaded yet (`main`), KERAS_BACKEND is set to the run's for this process, with a
    line where this machine would load another (`configured_backend`); refused where that backend is not installed,
    or where this process runs another already (the `train` entry point loads Keras first). The precision and XLA
    choice: refused where this machine computes them wrongly (`fitting.check_recorded`); `train.run` goes on with
    them."""
    backend, precision, jit, source = recorded_training(run_id)
    if backend:
        go_on_with_backend(backend, source)
    if precision == "mixed_bfloat16" and jit:  # the one choice a machine may not run (loads Keras)
        from pipeline import fitting

        fitting.check_recorded(fitting.Recorded(precision, jit, source), cfg.train)


def go_on_with_backend(backend: str, source: str) -> None:
    """Make this process run Keras on `backend`, the one `source` (a resumed run, in words) trained on (see
    `check_resumed_machine`)."""
    loaded = "keras" in sys.modules
    if loaded:
        import keras

        here = keras.backend.backend()
    else:
        here = configured_backend()
    if here == backend:
        return
    if importlib.util.find_spec(backend) is None:  # Keras's backend names are their packages' names
        raise config.ConfigError(f"KERAS_BACKEND: {source} on {backend}, which is not installed here (this machine "
                                 f"runs {here}); install {backend} to go on with it, or resume=never to start afresh")
    if loaded:
        raise config.ConfigError(f"KERAS_BACKEND: {source} on {backend}, and this process runs {here}; set "
                                 f"KERAS_BACKEND={backend} to go on with it, or resume=never to start afresh")
    os.environ["KERAS_BACKEND"] = backend
    print(f"KERAS_BACKEND: {backend}, as {source} on it; this machine would load {here} (resume=never starts "
          f"afresh on it)", flush=True)


def configured_backend() -> str:
    """The backend Keras loads in this process, read as Keras reads it but without loading it: KERAS_BACKEND, else
    `backend` in keras.json (in $KERAS_HOME, else ~/.keras, or /tmp/.keras where the home folder is not writable),
    else tensorflow."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    try:
        chosen = json.loads((data.keras_home() / "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        chosen = None
    return chosen or "tensorflow"


TRAINING_BACKENDS = ("jax", "tensorflow", "torch")  # numpy's and openvino's Keras only infers: no fit


def check_configured_backend() -> None:
    """ConfigError, before Keras loads, where the backend it would load (`configured_backend`) is none of Keras's
    (KERAS_BACKEND=JAX: its names are lower case), cannot train (numpy, openvino: `main` failed in its train run
    with a traceback) or is not installed here: Keras's import failed on it with a traceback ("Unable to import
    backend : JAX"), `main` after checking its inputs, a sweep after its sweep run, a prepare run and its study had
    begun. Nothing to check where Keras is loaded already."""
    if "keras" in sys.modules:
        return
    backend = configured_backend()
    where = "KERAS_BACKEND" if os.environ.get("KERAS_BACKEND") else f"backend in {data.keras_home() / 'keras.json'}"
    if backend not in config.KERAS_BACKENDS:
        raise config.ConfigError(f"{where}: {backend!r} is no Keras backend ({', '.join(config.KERAS_BACKENDS)})")
    if backend not in TRAINING_BACKENDS:
        raise config.ConfigError(f"{where}: {backend} is a Keras backend that cannot train; name one that can "
                                 f"({', '.join(TRAINING_BACKENDS)})")
    if importlib.util.find_spec(backend) is None:  # Keras's backend names are their packages' names
        installed = [name for name in TRAINING_BACKENDS if importlib.util.find_spec(name)]
        raise config.ConfigError(f"{where}: {backend} is not installed here; install it, or name an installed backend"
                                 f" (KERAS_BACKEND={' or '.join(installed)})" if installed else
                                 f"{where}: {backend} is not installed here, nor is any backend Keras trains on; "
                                 f"install one ({', '.join(TRAINING_BACKENDS)})")


def refuse_unusable_backend() -> None:
    """`check_configured_backend` for an entry point whose module imports Keras as it loads (`train`, `evaluate`:
    called at its top, run as a command, before that import): a backend Keras cannot load is refused as `cli` refuses
    a bad param, one line and exit 2 (a run `mlflow run` opened for it ends FAILED and goes to the trash). Keras's
    import printed its traceback ("Unable to import backend : JAX"), exit 1, and left `mlflow run`'s run FAILED. The
    entry points that load Keras later (`main`, `sweep`, `prepare`, `register`) call `check_configured_backend` in
    their `main`, inside `cli`."""
    try:
        check_configured_backend()
    except config.ConfigError:
        cli(check_configured_backend)  # refused again inside `cli`, which says so and exits


def check_known_training_images(cfg: config.Config, dataset_uri: str | None = None) -> None:
    """ConfigError where `data.*` gives, before any data is read (`known_training_images`), too few training images to
    hold out train.validation_fraction or, with train.drop_remainder, to make a whole batch
    (`config.check_training_images`). A path's count only reading it tells: `dataset_uri`, a dataset prepared from it
    (given, or one to reuse), tells it where its prepare run logged it (`prepare.training_images`); else
    `data.max_train` bounds it: too few at that bound is too few at any count below it (refused before prepare, not
    in the train run after it)."""
    images = known_training_images(cfg) or (prepare.training_images(dataset_uri) if dataset_uri else None)
    if images:
        config.check_training_images(cfg.train, images)
    elif cfg.data.max_train:
        try:
            config.check_training_images(cfg.train, cfg.data.max_train)
        except config.ConfigError as exc:
            raise config.ConfigError(f"{exc} (data.max_train={cfg.data.max_train}: {cfg.data.source} gives at most "
                                     f"that many)") from None


def check_known_batches(cfg: config.Config, dist, dataset_uri: str = "") -> None:
    """ConfigError, before any run opens, for a global batch the replicas of `dist` (a `distribute.Distribution`) cannot
    share (`Distribution.check_batches`), with the images known now (`known_split_images`). The train run checks again
    once it has the data (`fitting.check_replica_batches`): a path prepared for the first time tells its counts only
    then. Refused there, a prepare run had finished and the train run (and main's) ended FAILED for a batch the
    params alone ruled out."""
    if dist.replicas < 2:  # one replica takes any batch: no count to look up (a path's digest, a store query)
        return
    t = cfg.train
    dist.check_batches(t.batch_size, t.drop_remainder, cfg.model.ghost_batch, *known_split_images(cfg, dataset_uri))


def known_split_images(cfg: config.Config, dataset_uri: str = "") -> tuple[int | None, int | None]:
    """(training images, validation images) a run of `cfg` trains and validates on, as far as they are known before
    any data is read: `data.*`'s counts (cifar10, synthetic), else those the prepare run of `dataset_uri` (or of the
    prepared dataset these params reuse) logged; None for a count not known yet. Validation holds out
    `train.validation_fraction` of the training images, or with 0 takes the test split."""
    train = known_training_images(cfg)
    test = {"cifar10": CIFAR10_TEST_IMAGES, "synthetic": cfg.data.synthetic_test}.get(cfg.data.source)
    if test and cfg.data.max_test:
        test = min(test, cfg.data.max_test)
    if train is None:
        dataset_uri = dataset_uri or prepare.find_prepared(prepare.prepare_key(cfg)) or ""
        if dataset_uri:
            train, test = prepare.training_images(dataset_uri), prepare.test_images(dataset_uri)
    if train is None:
        return None, test
    held_out = config.held_out_images(cfg.train.validation_fraction, train)
    return train - held_out, held_out if cfg.train.validation_fraction else test


def known_training_images(cfg: config.Config) -> int | None:
    """The training images `data.*` gives before any data is read (cifar10: 50,000; synthetic: its count; at most
    `data.max_train`), or None for a path, whose count only reading it tells."""
    images = {"cifar10": CIFAR10_TRAIN_IMAGES, "synthetic": cfg.data.synthetic_train}.get(cfg.data.source)
    return images and (min(images, cfg.data.max_train) if cfg.data.max_train else images)


def with_dataset_params(cfg: config.Config, dataset_uri: str) -> config.Config:
    """`cfg` with the `data.*` params the dataset at `dataset_uri` was prepared with; a note on stderr names
    those that differ from `cfg`'s."""
    ours = cfg.flat("data")
    theirs = {k: v for k, v in prepare.dataset_params(dataset_uri).items() if k in ours}
    changed = {k: v for k, v in theirs.items() if v != ours[k]}
    if changed:
        print(f"note: the data params are the dataset's ({dataset_uri}): "
              + ", ".join(f"{k}={v} (params: {ours[k]})" for k, v in sorted(changed.items())), file=sys.stderr)
    return config.from_run_params({**cfg.flat(), **theirs})


def resolve_inputs(cfg: config.Config, *, resume: str, dataset_uri: str = "") -> tuple[str, str | None]:
    """(dataset URI, train run to resume or None), for inputs `check_inputs` passed: an identical finished
    prepare is reused, else prepare runs (nested in the active run); see `find_resumable`. ConfigError, before the train
    run opens, where a path's training images, counted now, are too few for the params (`check_known_training_images`:
    that train run was left FAILED)."""
    dataset_uri = dataset_uri or prepare.ensure_prepared(cfg)
    resumed = find_resumable(cfg, dataset_uri, resume)
    if resumed is None:
        check_known_training_images(cfg, dataset_uri)
    return dataset_uri, resumed
