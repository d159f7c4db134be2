"""Step 1, prepare: read the data source once and materialise it as one artifact.

Reads:  the source named by `data.source` (see pipeline.data), before its run opens (`read_source`): data refused
        as it is read leaves no run.
Writes: artifact `dataset/dataset.npz` (uint8 images, int32 labels, class names, per-channel
        mean/std in 0-255 units) and `dataset/dataset.json` (counts, stats, digests, source, the data params);
        an MLflow dataset input carrying the first 32 hex digits of the array bytes' sha256 (MLflow's digest column
        is 36 characters); tags `prepare_key`, `dataset_sha256` (the whole sha256) and `source_sha256` (the source
        file's, to check against a published one; a folder's: `data.source_digest`; none for synthetic), also in
        dataset.json; metrics `train_images`, `test_images` and `test_images_in_train` (test images that are training
        images too, pixel for pixel: test_acc on them overstates), the last also in dataset.json and the run's
        description, and said again whenever the run is reused.
Returns the dataset URI `runs:/<run id>/dataset/dataset.npz` that train and evaluate read; the entry point prints it as
the last line on stdout, `dataset_uri=runs:/...`, the -P they take it as.

`ensure_prepared` reuses a finished prepare run whose inputs are identical: the data params that have an effect
(compared as the strings MLflow stores), the source's digest, this code's digest and, for images, their decoders'
versions (Pillow's, libjpeg-turbo's...).
What is recorded, and how a dataset URI is checked and read back: `pipeline.tracking.steps`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipeline import config, data
from pipeline.tracking import (
    active_run_id,
    apart_from_wrapper_run,
    artifact_dir,
    cli,
    code_digest,
    finished_runs,
    json_digest,
    step_run,
    steps,
)
from pipeline.tracking.resume import step_lock

DATASET_ARTIFACT = steps.DATASET_ARTIFACT


def prepare_key(cfg: config.Config) -> str:
    """Cache key of a prepare run: the data params that have an effect (`config.effective_params`; `data.source` as
    `config.source_identity`: the same file however spelled), source digest, code digest, and the versions of what
    else makes the arrays: the image decoders of a source of images (`data.decoders`), NumPy where its seeded
    generator draws them (the synthetic dataset, a subset): it keeps a seed's stream only within one build."""
    cfg = config.whole_splits(cfg)  # data.max_train 60000 of CIFAR-10's 50,000: all, as 0, and drawn from no seed
    params = {**config.effective_params(cfg, "data"), "data.source": config.source_identity(cfg.data.source)}
    drawn = cfg.data.source == "synthetic" or cfg.data.max_train or cfg.data.max_test
    source = data.source_digest(cfg.data.source)
    inputs = {"params": params, "source_digest": source,
              "code_digest": code_digest("data", "prepare"), "decoders": data.decoders(cfg.data.source),
              **({"numpy": np.__version__} if drawn else {})}
    key = json_digest(inputs)
    _source_digests[key] = source  # the key holds it: the digest of what the run under it read
    return key


_source_digests: dict[str, str] = {}  # prepare key -> its source's digest (`data.source_digest`), for `run` to record


def build(cfg: config.Config) -> data.Dataset:
    """The dataset `data.*` describes, in memory: deterministic, so every host builds the same one."""
    source = data.load_source(cfg.data.source, synthetic_train=cfg.data.synthetic_train,
                              synthetic_test=cfg.data.synthetic_test, seed=cfg.data.seed)
    for name, split, images in (("max_train", "training", len(source.x_train)),
                                ("max_test", "test", len(source.x_test))):
        if getattr(cfg.data, name) > images:  # a typo (60000 for 6000) or a smaller source than meant: said
            print(f"warning: data.{name} {getattr(cfg.data, name)} is above the {images} {split} images "
                  f"{cfg.data.source} holds: all {images} are taken, as with 0", file=sys.stderr, flush=True)
    return source.subset(max_train=cfg.data.max_train, max_test=cfg.data.max_test, seed=cfg.data.seed)


def read_source(cfg: config.Config, key: str | None = None) -> str:
    """Read the data `cfg` prepares before its prepare run opens (and `main`'s, `train`'s): data refused as it is read
    (a corrupt image, a class folder with none) is a DataError naming the file there, not a prepare run left FAILED
    (and main's). So is a source whose digest changed while it was read (a folder still being copied in): it was
    prepared half-copied under the key of what it held before. Kept, one dataset at a time, for `run` under the same
    key; returns the key."""
    key = key or prepare_key(cfg)
    if key not in _read:
        _read.clear()
        dataset = build(cfg)
        if prepare_key(cfg) != key:
            raise data.DataError(f"{cfg.data.source}: changed while it was read (a copy still being written?): "
                                 "prepare it once it is whole")
        _read[key] = dataset
    return key


_read: dict[str, data.Dataset] = {}  # what `read_source` read, by prepare key, until `run` takes it


def run(cfg: config.Config, *, key: str | None = None) -> str:
    """Prepare the dataset inside the active run (the one `read_source` read under `key`, else read now); return its
    dataset URI."""
    key = key or prepare_key(cfg)
    dataset = _read.pop(key, None) or build(cfg)
    digest = dataset.digest()
    mean, std = dataset.channel_stats()
    in_train = data.test_images_in_train(dataset.x_train, dataset.x_test)  # of the subset kept: what is scored
    source = _source_digests.get(key) or data.source_digest(cfg.data.source)
    source = None if source == "synthetic" else source  # made by code: no file to check
    summary = {
        "source": cfg.data.source, "source_sha256": source, "sha256": digest,
        "class_names": list(dataset.class_names),
        "train_images": len(dataset.x_train), "test_images": len(dataset.x_test), "test_images_in_train": in_train,
        "mean": mean.round(4).tolist(), "std": std.round(4).tolist(), "params": cfg.flat("data"),
    }
    warn_test_images_in_train(cfg.data.source, in_train, len(dataset.x_test))
    steps.log_prepared(cfg, dataset, digest, key, in_train, source)
    with artifact_dir("dataset") as folder:
        dataset.save(folder / "dataset.npz")
        (folder / "dataset.json").write_text(json.dumps(summary, indent=2))
    # both named: the arrays' alone was taken for the file's, and compared with an archive's published sha256 in vain
    read = f", of the {'folder' if Path(cfg.data.source).is_dir() else 'file'} read {source}" if source else ""
    print(f"prepared {cfg.data.source}: {len(dataset.x_train)} train / {len(dataset.x_test)} test, sha256 of the "
          f"arrays {digest}{read}")
    return f"runs:/{active_run_id()}/{DATASET_ARTIFACT}"


def warn_test_images_in_train(source: str, in_train: int | None, test_images: int | None) -> None:
    """Say on stderr that `in_train` of the test images are training images too (nothing if none)."""
    if in_train:
        print(f"warning: {source}: {in_train} of {test_images} test images are also training images (the same "
              f"pixels): test_acc scores them as unseen, and register moves no alias on it", file=sys.stderr,
              flush=True)


def find_prepared(key: str) -> str | None:
    """Dataset URI of the first finished prepare run with the same key, in any experiment, if any: always the same
    one, as a train run's `train_key` holds it (the newest, a killed main's rerun trained afresh on the dataset of
    an identical prepare run on its own meanwhile, instead of resuming). One whose dataset file is gone from the
    artifact store (removed to free the disk) is passed over, with a note: every command was refused on it."""
    for run_id in finished_runs("prepare_key", key):
        uri = f"runs:/{run_id}/{DATASET_ARTIFACT}"
        if steps.has_artifact(uri):
            return uri
        if run_id not in _gone:
            _gone.add(run_id)
            print(f"note: prepare run {run_id} holds no {DATASET_ARTIFACT} any more (its artifacts removed?): not "
                  f"reused", file=sys.stderr)
    return None


_gone: set[str] = set()  # the prepare runs `find_prepared` said it passed over (it is asked several times a command)


def ensure_prepared(cfg: config.Config) -> str:
    """Reuse an identical finished prepare run, or run prepare as a nested run (a run of its own beside the one
    `mlflow run . -e train` opened for training: `apart_from_wrapper_run`). Either way the dataset URI every later
    command finds (`find_prepared`): an identical prepare started beside this one may have finished first."""
    key = prepare_key(cfg)
    found = find_prepared(key)
    if found:
        _read.pop(key, None)  # read ahead, then prepared by another command meanwhile
        print(f"reusing prepared dataset {found}")
        # said again: the console of the run that prepared it is long gone
        warn_test_images_in_train(cfg.data.source, *steps.prepared_counts(found))
        return found
    read_source(cfg, key)
    with apart_from_wrapper_run(cfg) as prepare_cfg, step_run(prepare_cfg, "prepare"):
        prepared = run(cfg, key=key)
    return find_prepared(key) or prepared


def check_source(cfg: config.Config) -> None:
    """Refuse, before any run opens, a data source there is nothing to prepare from (DataError naming data.source): a
    missing path, or CIFAR-10 neither in the Keras cache nor downloadable (found and verified, or downloaded, now).
    Offline, the default source failed inside prepare: main's run and prepare's were left FAILED in the store."""
    data.source_digest(cfg.data.source)
    if cfg.data.source == "cifar10":
        data.fetch_cifar10()


def check_dataset_uri(dataset_uri: str) -> None:
    """Refuse a dataset URI that names no prepared dataset file or no artifact (DataError naming `dataset_uri`), or
    one of a run in MLflow's trash (ConfigError), before a step opens its run."""
    if not dataset_uri.strip():  # `-e train -P dataset_uri=" "`: "  names no prepared dataset"
        raise data.DataError(f"dataset_uri: {dataset_uri!r} is blank; give runs:/<prepare run id>/"
                             f"{steps.DATASET_ARTIFACT}, or leave it empty to prepare (or reuse) the data -P data "
                             f"names")
    if not dataset_uri.endswith(".npz"):  # the folder, or dataset.json beside the file, failed later as unreadable
        meant = steps.dataset_meant(dataset_uri) or f"runs:/<prepare run id>/{steps.DATASET_ARTIFACT}"
        raise data.DataError(f"dataset_uri: {dataset_uri} names no prepared dataset (.npz); give {meant}")
    steps.check_artifact_uri(dataset_uri, "dataset_uri")
    steps.check_dataset_not_trashed(dataset_uri)


def dataset_params(dataset_uri: str) -> dict[str, str]:
    """The `data.*` params the dataset at `dataset_uri` was prepared with (DataError if it does not say)."""
    return steps.dataset_params(dataset_uri)


def training_images(dataset_uri: str) -> int | None:
    """How many training images the dataset at `dataset_uri` holds, as its prepare run logged it; None where no prepare
    run (`runs:/`) says."""
    return steps.prepared_training_images(dataset_uri)


def test_images(dataset_uri: str) -> int | None:
    """How many test images the dataset at `dataset_uri` holds, as its prepare run logged it; None where no prepare run
    (`runs:/`) says."""
    return steps.prepared_training_images(dataset_uri, "test")


def load_dataset(dataset_uri: str) -> data.Dataset:
    """Download (or locate) a prepared dataset artifact and read it; a downloaded copy goes once read."""
    with steps.downloaded_artifact(dataset_uri, "dataset_uri") as path:
        return data.load_prepared(path)


def main() -> None:
    args = config.entry_point_parser("prepare", __doc__.split("\n")[0]).parse_args()
    cfg = config.load_from_cli(args.params, args.overrides, data=args.data)
    config.note_unread("prepare", args.overrides)
    from pipeline.inputs import check_configured_backend  # (inputs imports this module)

    check_configured_backend()  # Keras downloads CIFAR-10: a backend it cannot load failed as "cannot download"
    check_source(cfg)  # a missing path or CIFAR-10 out of reach fails here, before any run is opened
    key = read_source(cfg)  # and data that cannot be read
    with step_lock() as hold, step_run(cfg, "prepare") as step:
        hold(step)  # killed, it is left for the next main to end
        dataset_uri = run(cfg, key=key)
    # the last line on stdout, as `-e train` and `-e evaluate` take it: `-P dataset_uri=runs:/...`
    print(f"dataset_uri={dataset_uri}")


if __name__ == "__main__":
    cli(main)
