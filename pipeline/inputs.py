"""A training command's inputs (data, a dataset URI, a run to resume, the host's place in a cluster),
checked before any run opens and before Keras loads, so that a wrong path or run id is refused in the
seconds the interpreter and MLflow take to start, not after TensorFlow's ~12 CPU-s import. Shared by
the `main` and `train` entry points.
"""

from __future__ import annotations

from pipeline import config, prepare
from pipeline.distribute import cluster_from_env
from pipeline.tracking.resume import config_to_resume, find_resumable


def check_inputs(cfg: config.Config, *, resume: str, dataset_uri: str = "") -> str:
    """Check a training command's inputs before any run opens (ConfigError or DataError naming the key);
    return the dataset URI to train on ("" = prepare or reuse one, see `resolve_inputs`).

    resume, a run id: `cfg` (and `dataset_uri`) must be what that run started with, and its dataset is
    used (see `config_to_resume`). A dataset URI must name an artifact; else `data.source` must exist.
    The backend must support the params, and in a cluster (TF_CONFIG) only the chief runs the steps.
    """
    if resume not in ("", "never"):
        dataset_uri = config_to_resume(resume, cfg, dataset_uri)
    if dataset_uri:
        prepare.check_dataset_uri(dataset_uri)
    else:
        prepare.prepare_key(cfg)  # a missing data path fails here
    if cfg.train.feed == "device":  # the one param that depends on the backend: only it loads Keras here
        from pipeline.fitting import check_backend

        check_backend(cfg)
    cluster = cluster_from_env()
    if cluster and not cluster.chief:
        raise config.ConfigError(f"TF_CONFIG: this host is {cluster.task}; the pipeline runs on the chief, "
                                 f"here run `python -m pipeline.train` with the chief's params")
    return dataset_uri


def resolve_inputs(cfg: config.Config, *, resume: str, dataset_uri: str = "") -> tuple[str, str | None]:
    """(dataset URI, train run to resume or None), for inputs `check_inputs` passed: an identical finished
    prepare is reused, else prepare runs (nested in the active run); see `find_resumable`."""
    dataset_uri = dataset_uri or prepare.ensure_prepared(cfg)
    return dataset_uri, find_resumable(cfg, dataset_uri, resume)
