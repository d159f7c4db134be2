"""What prepare, evaluate, compare and main record in MLflow and read back from it.

- prepare: `log_prepared` (data params, cache key and digest tags, description, the MLflow dataset
  input, counts); `log_dataset_input` logs that input on a train run too; `check_artifact_uri` and
  `download_artifact` (`downloaded_artifact`: for a block only) read a dataset URI back, `dataset_params` the data
  params it was prepared with.
- evaluate: `load_classifier` (the served pyfunc's Python model, refused where the scoring code logged with it,
  SCORING_CODE, is not the code this process loaded: `scoring_code_changes`), `log_evaluation` (params, and the test
  metrics on the run and on the logged model, `logged_model_id`).
- compare: `find_experiment_id`, `search_train_runs`, `check_comparison_experiment` (where the comparison run goes),
  `log_comparison`.
- main: `log_pipeline_results`, the headline results on the parent run.
Files a step writes go in through `pipeline.tracking.artifact_dir`; compare's, written before its run opens (a failed
plot leaves no run), through `log_comparison`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from pipeline import config, data, serve
from pipeline.tracking import (
    DATASET_SHA256,
    TEST_DATA_TAG,
    fit_note,
    local_path,
    log_params,
    model_id,
    prepare_run_id,
    trained_dataset_uri,
    unwritable_artifact_location,
    written_despite_a_race,
)

# ---------------------------------------------------------------- prepare

DATASET_ARTIFACT = "dataset/dataset.npz"


def log_prepared(cfg: config.Config, dataset: data.Dataset, digest: str, key: str, in_train: int,
                 source_sha256: str | None = None) -> None:
    """Record a prepared dataset on the active run: the `data.*` params, tags `prepare_key`, `dataset_sha256` and
    `source_sha256` (of what was read: `data.source_digest`; none where None), the run's description, an MLflow dataset
    input and the image counts (`test_images_in_train` too: test images that are training images as well)."""
    mlflow.log_params(cfg.flat("data"))
    mlflow.set_tags({"prepare_key": key, "dataset_sha256": digest,
                     **({"source_sha256": source_sha256} if source_sha256 else {})})
    overlap = (f"\n\n**{in_train} of the test images are also training images** (the same pixels): test_acc "
               f"scores them as unseen, and register moves no alias on it." if in_train else "")
    mlflow.set_tag("mlflow.note.content", f"Dataset `{cfg.data.source}`, sha256 `{digest}`, "
                   f"{len(dataset.x_train)} train / {len(dataset.x_test)} test images.{overlap}")
    # MLflow keeps dataset digests in a 36-character column: log the first 32 hex digits there;
    # the full sha256 is in the run's tags and in dataset.json.
    found = mlflow.data.from_numpy(dataset.x_train, targets=dataset.y_train, source=_source(cfg),
                                   name=Path(cfg.data.source).name or cfg.data.source, digest=digest[:32])
    log_inputs(mlflow.active_run().info.run_id, [
        DatasetInput(found._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "train")])])
    mlflow.log_metrics({"train_images": len(dataset.x_train), "test_images": len(dataset.x_test),
                        "test_images_in_train": in_train})


def prepared_counts(dataset_uri: str) -> tuple[int | None, int | None]:
    """(test_images_in_train, test_images) as the prepare run of `runs:/<id>/...` logged them; None where unknown."""
    metrics = mlflow.MlflowClient().get_run(dataset_uri.removeprefix("runs:/").partition("/")[0]).data.metrics
    return tuple(int(metrics[k]) if k in metrics else None for k in ("test_images_in_train", "test_images"))


def prepared_training_images(dataset_uri: str, split: str = "train") -> int | None:
    """The training images (`split` "test": the test images) of the dataset at `dataset_uri`, as the prepare run of
    `runs:/<id>/...` logged them (metric train_images, test_images); None where unknown (another URI, or a prepare
    run gone)."""
    if not dataset_uri.startswith("runs:/"):
        return None
    try:
        metrics = mlflow.MlflowClient().get_run(dataset_uri.removeprefix("runs:/").partition("/")[0]).data.metrics
    except MlflowException:
        return None
    return int(metrics[f"{split}_images"]) if f"{split}_images" in metrics else None


def log_dataset_input(dataset_uri: str, context: str, dataset: data.Dataset | None = None) -> DatasetEntity | None:
    """Log on the active run, with `context` (`train`, `test`), the dataset input of the prepare run `runs:/<id>/...`
    names: the same name, digest and source, so the MLflow UI's Dataset column and filter show which data each
    training and evaluate run used (a train run had none: the data was named only in its description). For a dataset
    file no prepare run logged (`-P dataset_uri=PATH`), `dataset` read from it: an input named after the file, of the
    digest a prepare run of those arrays logs and the file as its source. Nothing where there is neither (a prepare
    run gone). Returns the input logged, None for none."""
    prepare_id = prepare_run_id(dataset_uri)
    client = mlflow.MlflowClient()
    try:
        inputs = [found.dataset for found in client.get_run(prepare_id).inputs.dataset_inputs] if prepare_id else []
    except MlflowException:
        inputs = []  # the prepare run was deleted for good (`mlflow gc`)
    if not inputs and dataset is not None and not prepare_id:
        path = Path(local_path(dataset_uri)).resolve()
        inputs = [mlflow.data.from_numpy(dataset.x_train, targets=dataset.y_train, source=path.as_uri(),
                                         name=path.name, digest=dataset.digest()[:32])._to_mlflow_entity()]
    log_inputs(mlflow.active_run().info.run_id, [
        DatasetInput(found, [InputTag(MLFLOW_DATASET_CONTEXT, context)]) for found in inputs[:1]])
    return inputs[0] if inputs else None


def log_inputs(run_id: str, inputs: list[DatasetInput]) -> None:
    """`MlflowClient.log_inputs`, once more where another process inserted the same dataset (experiment, name and
    digest) between MLflow's check for it and its own insert (`written_despite_a_race`): that insert fails on the
    table's unique key, rolled back whole, and the second attempt finds the row and links it. Three mains started
    together on one store, each preparing the same data, failed so (SQLite's `UNIQUE constraint failed: datasets...`,
    exit 1); so did team members' on the team server (PostgreSQL's `duplicate key value violates unique constraint`,
    which the server sends as its message alone)."""
    written_despite_a_race(lambda: mlflow.MlflowClient().log_inputs(run_id, inputs), "datasets")


def trained_data_digest(run_id: str) -> str | None:
    """The digest of the data train run `run_id` trained on: its dataset input's (context `train`: the first 32 hex
    digits of the prepared arrays' sha256, whatever the data params say: an image folder edited between two runs of
    the same `data.source` is other data), else, for a run from before it logged one, its prepare run's tag
    `dataset_sha256` cut to the same length; None where neither is known."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
        for found in run.inputs.dataset_inputs if run.inputs else []:
            if {t.key: t.value for t in found.tags}.get(MLFLOW_DATASET_CONTEXT) == "train":
                return found.dataset.digest
        prepare_id = prepare_run_id(trained_dataset_uri(run))
        digest = client.get_run(prepare_id).data.tags.get("dataset_sha256") if prepare_id else None
    except MlflowException:
        return None  # the run or its prepare run deleted for good
    return digest[:32] if digest else None


def model_data_digest(logged_model: str | None) -> str | None:
    """`trained_data_digest` of the run that logged the model `logged_model` (an id); None where it is unknown (no
    logged model, a model no run logged, the model or its run deleted for good)."""
    try:
        source = mlflow.get_logged_model(logged_model).source_run_id if logged_model else None
    except MlflowException:
        return None
    return trained_data_digest(source) if source else None


def _source(cfg: config.Config):
    if cfg.data.source == "synthetic":
        return CodeDatasetSource(tags={"generator": "pipeline.data.make_synthetic", "seed": str(cfg.data.seed)})
    if cfg.data.source == "cifar10":
        return data.CIFAR10_URL
    return Path(cfg.data.source).resolve().as_uri()


def check_artifact_uri(uri: str, what: str) -> None:
    """Refuse a URI that names no artifact (or, not `runs:/`, no file): DataError naming the key `what`."""
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    if not uri.startswith("runs:/"):
        if not Path(local_path(uri)).exists():
            raise data.DataError(f"{what}: no file {uri}{data.shells_folder_hint(uri)}")
        return
    try:
        found = has_artifact(uri)
    except MlflowException as exc:
        raise data.DataError(f"{what}: cannot read {uri} ({exc.message})".replace("\n", " ")) from None
    if not found:
        raise data.DataError(f"{what}: run {run_id} has no artifact {path}")


def has_artifact(uri: str) -> bool:
    """Whether the artifact `runs:/<run id>/<path>` is in its run's artifact store (MlflowException if the store
    cannot be read)."""
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    folder = path.rpartition("/")[0] or None
    return path in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, folder)}


def has_model(model_uri: str) -> bool:
    """Whether `runs:/<run id>/<path>` holds a model's MLmodel file (False where the run or its store cannot be read):
    a model folder logged as artifacts has one but no logged model (`logged_model_id`), and still loads."""
    run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
    try:
        return has_artifact(f"runs:/{run_id}/{path.strip('/') + '/' if path.strip('/') else ''}MLmodel")
    except MlflowException:
        return False


def download_artifact(uri: str, what: str) -> str:
    """Download (or locate) the artifact `uri`; its local path. DataError naming the key `what` if it cannot."""
    # a plain path is the file it names: MLflow would unquote it as it does a file: URI (a folder `a%20b` read as `a b`)
    found = Path(uri).resolve().as_uri() if not urllib.parse.urlparse(uri).scheme else uri
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=found)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise data.DataError(f"{what}: cannot read {uri} ({exc})") from None


@contextlib.contextmanager
def downloaded_artifact(uri: str, what: str) -> Iterator[str]:
    """The artifact `uri` as a local file for the duration: a local file where it is, anything else downloaded into a
    temporary folder removed after (MLflow's own download into one of its own was left in the temporary folder).
    DataError naming the key `what` if it cannot be."""
    if not urllib.parse.urlparse(uri).scheme or uri.startswith("file:"):
        yield download_artifact(uri, what)
        return
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise data.DataError(f"{what}: cannot read {uri} ({exc})") from None
        yield path


def dataset_params(uri: str) -> dict[str, str]:
    """The `data.*` params of the prepare step that wrote the dataset at `uri`: its run's (`runs:/`), else those in
    the `dataset.json` it wrote beside the file. DataError naming `dataset_uri` if neither says: a train run's
    `data.*` params are those of the data it trains on, never the params file's guess."""
    if uri.startswith("runs:/"):
        params = mlflow.MlflowClient().get_run(uri.removeprefix("runs:/").partition("/")[0]).data.params
    else:
        summary = Path(local_path(uri)).with_name("dataset.json")
        try:
            params = json.loads(summary.read_text()).get("params", {}) if summary.is_file() else {}
        except (ValueError, AttributeError, OSError) as exc:  # not JSON, or not the mapping prepare writes
            raise data.DataError(f"dataset_uri: {summary} beside the dataset is not prepare's dataset.json "
                                 f"({exc})") from None
        params = params if isinstance(params, dict) else {}
    found = {k: v for k, v in params.items() if k.startswith("data.")}
    if not found:
        raise data.DataError(f"dataset_uri: {uri} was not written by a prepare step (it records no data.* params); "
                             f"give runs:/<prepare run id>/{DATASET_ARTIFACT}")
    return found


# ---------------------------------------------------------------- evaluate

# The modules of pipeline/ whose code a served model runs to score pixels: `serve` (ImageClassifier's `load_context`,
# `predict_proba`, `pad_for_jax`, `check_pixels`) and `augment` (the test-time views, `tta_views`, and the custom layers
# of models logged before inference copies dropped them). What else it imports, pipeline/__init__.py, config and data,
# gives it constants and decodes encoded images, which evaluate's prepared pixels never go through
# (`test_serve.py::test_scoring_a_served_model_runs_no_code_of_pipeline_but_scoring_code`). A process that has imported
# `pipeline` (evaluate, register) loads a logged model's Python model with its own copy of these, not the model's
# `code/pipeline/` that `mlflow models serve` runs: `load_classifier` refuses a model whose copy differs from the source
# this process loaded (`pipeline.source`: the code it runs, whatever the files on disk hold by then). Part of
# TRAIN_CODE, so a model `main` trains, or goes on from (`trained_before_a_failure`), always matches: it logs the
# source it loaded, and `train_code` is that source's digest.
SCORING_CODE = serve.SCORING_CODE


def scoring_code_changes(model_dir: str | Path) -> list[str]:
    """The files of SCORING_CODE (`pipeline/<module>.py`) whose copy logged with the model downloaded at `model_dir`
    (its pyfunc's code folder, `code/pipeline/`: what serving it runs) differs, byte for byte, from the source this
    process loaded (`pipeline.source`: the code it scores with, not the files on disk now, which an edit or a pull may
    have changed since), or is missing there; none for a model logged without a copy of `pipeline` (not by this
    pipeline)."""
    meta = mlflow.models.Model.load(Path(model_dir) / "MLmodel")
    code = (meta.flavors.get("python_function") or {}).get("code")
    logged = Path(model_dir) / code / "pipeline" if code else None
    if logged is None or not logged.is_dir():
        return []
    return serve.scoring_code_changes(logged)


def other_flavor(model_dir: str | Path) -> str | None:
    """What the model downloaded at `model_dir` is, where it is no pyfunc of a Python model (as `serve.ImageClassifier`
    is logged): its flavors (`keras`, `sklearn`, ...) but python_function; None for a Python model's pyfunc."""
    flavors = mlflow.models.Model.load(Path(model_dir) / "MLmodel").flavors
    if (flavors.get("python_function") or {}).get("loader_module") == "mlflow.pyfunc.model":
        return None
    return ", ".join(name for name in flavors if name != "python_function") or "python_function"


def load_classifier(model_uri: str, logged_model: str | None = None):
    """The Python model of the pyfunc logged at `model_uri` (a `serve.ImageClassifier`); ConfigError
    naming `model_uri` if it cannot be loaded, or if MLflow has its logged model as not whole: FAILED (its upload
    failed part way) or PENDING (cut short by a kill, or under way now). Such a model may load, from the files that
    arrived, and a score on it would be registered; the rerun of its training logs the model again. `logged_model`:
    the id `logged_model_id` read for `model_uri` already, which is loaded then (an alias may have moved since).
    ConfigError, before it is loaded, for a model of another flavor (`other_flavor`: Keras, scikit-learn, ...).

    ConfigError too, before Keras loads it, where its logged scoring code is not the code this process loaded
    (`scoring_code_changes`: an edit or a pull since it was trained): loaded here it would score with this process's
    code, not the code it is served with, and a score of it would not be the served model's."""
    found = logged_model or logged_model_id(model_uri)
    try:
        status = mlflow.get_logged_model(found).status if found else LoggedModelStatus.READY
    except MlflowException:
        status = LoggedModelStatus.READY  # no such model: loading it below says so
    if status != LoggedModelStatus.READY:
        raise config.ConfigError(f"model_uri: {model_uri} was not logged whole (status {status}: its upload failed or "
                                 f"was cut short, or is under way now); rerun the command that trained it, which logs "
                                 f"it again")
    try:
        # downloaded once (a local store's folder is read in place), its code compared, then loaded from there
        # the logged model whose status was read: a registry URI read again may name another by now
        folder = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{found}" if found else model_uri)
        changed, flavor = scoring_code_changes(folder), other_flavor(folder)
    except Exception as exc:  # noqa: BLE001 - a wrong URI surfaces as several MLflow error types
        raise config.ConfigError(f"model_uri: cannot load {model_uri} ({exc})".replace("\n", " ")) from None
    if flavor:  # loaded whole first, then refused as "cannot load (Unable to retrieve base model object from pyfunc)"
        raise config.ConfigError(f"model_uri: {model_uri} is not an image classifier this pipeline logged (a {flavor} "
                                 f"model): evaluate cannot score it")
    if changed:
        differ = "differs" if len(changed) == 1 else "differ"
        raise config.ConfigError(f"model_uri: {model_uri} is served with other scoring code than this process loaded "
                                 f"({', '.join(changed)} {differ} from the copy logged with it, which serving it "
                                 f"runs): scored here, its score would not be the served model's; check out the code "
                                 f"it was trained with{trained_at(found)} and score it there, or train it again with "
                                 f"this code")
    try:
        return mlflow.pyfunc.load_model(folder).unwrap_python_model()
    except Exception as exc:  # noqa: BLE001 - a broken model surfaces as several error types
        raise config.ConfigError(f"model_uri: cannot load {model_uri} ({exc})".replace("\n", " ")) from None


def in_trash(run_id: str | None) -> bool:
    """Whether run `run_id` is in MLflow's trash (deleted, its artifacts kept until `mlflow gc`); False for no run, or
    one this store does not have (reading its artifacts says so)."""
    try:
        return bool(run_id) and mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException:
        return False


def check_run_not_trashed(model_uri: str, logged_model: str | None, to: str = "score its model") -> None:
    """ConfigError naming `model_uri` where the run that logged its model (a `runs:/` URI's run, else the logged
    model's source run) is in MLflow's trash: its artifacts stay loadable until `mlflow gc`, and a score of it would
    land on a model its user discarded, for register to take (register refuses it too; `to`: what restoring it is
    for). Nothing to check for a model no run logged (a folder)."""
    run_id = model_uri.removeprefix("runs:/").partition("/")[0] if model_uri.startswith("runs:/") else None
    try:
        run_id = run_id or (mlflow.get_logged_model(logged_model).source_run_id if logged_model else None)
    except MlflowException:
        return  # no such model: loading it says so
    if in_trash(run_id):
        raise config.ConfigError(f"model_uri: {model_uri} was logged by run {run_id}, which is in MLflow's trash; "
                                 f"restore it (mlflow runs restore --run-id {run_id}) to {to}")


def check_dataset_not_trashed(dataset_uri: str) -> None:
    """ConfigError naming `dataset_uri` where it is a `runs:/` artifact of a run in MLflow's trash (a prepare run the
    user deleted): evaluate's score on it would land on the model as any other, train's model would name data whose
    run is gone."""
    run_id = dataset_uri.removeprefix("runs:/").partition("/")[0] if dataset_uri.startswith("runs:/") else None
    if in_trash(run_id):
        raise config.ConfigError(f"dataset_uri: {dataset_uri} was written by run {run_id}, which is in MLflow's "
                                 f"trash; restore it (mlflow runs restore --run-id {run_id}) to use it")


def trained_at(logged_model: str | None) -> str:
    """` (git commit <commit> of train run <id>)` for the logged model's source run, as far as it is known; ''."""
    try:
        run_id = mlflow.get_logged_model(logged_model).source_run_id if logged_model else None
        tags = mlflow.MlflowClient().get_run(run_id).data.tags if run_id else {}
    except MlflowException:
        return ""  # the model or its run deleted for good
    if not run_id:
        return ""
    commit = tags.get("git_commit") or tags.get("mlflow.source.git.commit")
    return f" (git commit {commit[:12]} of train run {run_id})" if commit else f" (train run {run_id})"


def log_evaluation(params: dict, metrics: dict[str, float], model_uri: str, test_data: str,
                   dataset_sha256: str | None = None, dataset: DatasetEntity | None = None) -> None:
    """Log evaluate's `params` and test `metrics` on the active run, and the metrics on the logged model
    `models:/m-...` too (they show on the model's page and feed register), with tag `test_data_sha256`
    (`test_data`: the test split's digest, which register compares before it compares scores); tag `dataset_sha256`
    (DATASET_SHA256: a local dataset file's bytes, as a train run of it tags them) on the run where given. `dataset`:
    the input `log_dataset_input` logged, which the model's metrics name (its page lists them by dataset)."""
    log_params(params)  # a -P `mlflow run` logged already kept as it logged it
    mlflow.log_metrics(metrics)
    mlflow.set_tags({TEST_DATA_TAG: test_data, **({DATASET_SHA256: dataset_sha256} if dataset_sha256 else {})})
    logged_model = logged_model_id(model_uri)
    if logged_model:
        mlflow.log_metrics(metrics, model_id=logged_model, dataset=dataset)
        mlflow.set_logged_model_tags(logged_model, {TEST_DATA_TAG: test_data})


def training_dataset_uri(model_uri: str) -> str | None:
    """The dataset URI the run that trained the model at `model_uri` (`logged_model_id`'s URIs) trained on;
    None where that is unknown (a model logged otherwise, its run deleted)."""
    logged_model = logged_model_id(model_uri)
    try:
        source = mlflow.get_logged_model(logged_model).source_run_id if logged_model else None
        if not source:
            return None
        return trained_dataset_uri(mlflow.MlflowClient().get_run(source)) or None
    except MlflowException:
        return None  # the model or its run deleted for good


def logged_model_id(model_uri: str) -> str | None:
    """The logged model behind `model_uri`: `models:/m-...` itself, a registry URI's version's
    (`registered_model_id`), or the one a `runs:/<run id>/<name>` URI loads (MLflow 3 logs a run's model as a logged
    model, whose id its MLmodel file holds); None for others (a folder) or where there is none. A `models:/` URI's
    trailing slash, which MLflow loads as without it, is read as without it (its scores went on the run only)."""
    registry_uri = model_uri.rstrip("/") if model_uri.startswith("models:/") else model_uri
    found = model_id(registry_uri) or registered_model_id(registry_uri)
    if found or not model_uri.startswith("runs:/"):
        return found
    try:
        return mlflow.models.get_model_info(model_uri).model_id
    except Exception:  # noqa: BLE001 - no such run or artifact: MLflow raises several types
        return None


def bare_id(model_uri: str) -> str | None:
    """Why `model_uri` is no URI where it is a bare id, and the URI meant: a logged model's id (`m-...`: MLflow
    answered "Invalid uri ... passed"), a run's id (MLflow answered "No such artifact", register "no model register
    takes") with the model that run logged; None for anything else, a path that exists included."""
    text = model_uri.strip()
    if not re.fullmatch(r"m-[0-9a-f]{32}|[0-9a-f]{32}", text) or Path(text).exists():
        return None
    if text.startswith("m-"):
        return f"{text} is a logged model's id, no URI: give models:/{text}"
    try:
        run = mlflow.MlflowClient().get_run(text)
    except MlflowException:
        return None  # no run of this store: the caller's own words
    step = run.data.tags.get("step", "")
    what = f"the id of {step} run {text}" if step else f"the id of run {text}"
    if (tagged := run.data.tags.get("model_uri") or run.data.params.get("model_uri") or "").startswith("models:/"):
        return f"{text} is {what}, no URI: give its model, {tagged}"
    if logged_model_id(f"runs:/{text}/model"):
        return f"{text} is {what}, no URI: give its model, runs:/{text}/model"
    return f"{text} is {what}, which logged no model: give a training run's model, runs:/<train run id>/model"


def dataset_meant(dataset_uri: str) -> str | None:
    """The dataset URI meant where `dataset_uri`, no .npz, names a run (its bare id, `runs:/<id>`,
    `runs:/<id>/dataset`): a prepare run's dataset, or the one a train, main or evaluate run used, and whose it is;
    None for anything else."""
    found = re.fullmatch(r"(?:runs:/)?([0-9a-f]{32})(?:/.*)?", dataset_uri.strip())
    if not found or Path(dataset_uri.strip()).exists():
        return None
    try:
        run = mlflow.MlflowClient().get_run(found[1])
    except MlflowException:
        return None
    step = run.data.tags.get("step", "")
    used = (f"runs:/{found[1]}/{DATASET_ARTIFACT}" if step == "prepare"
            else run.data.tags.get("dataset_uri") or run.data.params.get("dataset_uri"))
    return f"{used} (the dataset of {step or 'that'} run {found[1]})" if used else None


def copied_model_id(path: str) -> str | None:
    """The logged model a model's folder (a path or `file:` URI, as `mlflow.artifacts.download_artifacts` leaves it) is
    a copy of, as its MLmodel file names it; None for anything else."""
    try:
        return mlflow.models.get_model_info(path).model_id
    except Exception:  # noqa: BLE001 - no folder, no MLmodel: MLflow raises several types
        return None


def why_no_model(model_uri: str) -> str:
    """Why `runs:/<run id>/<path>` names no logged model (`logged_model_id` found none): no such run in this store, or
    no MLmodel file at that path of it (with the model the run names in its tag `model_uri`, as train tags it): yet,
    where the run is still running (a train run logs its model as it ends), or as it ended (FAILED, KILLED)."""
    run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
    if not run_id:
        return "no run id after runs:/"
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return f"no run {run_id} in this tracking store"
    tagged = run.data.tags.get("model_uri")
    named = f"; its model_uri tag is {tagged}" if tagged else ""
    where, status = f"{path or '/'} (no MLmodel file there{named})", run.info.status
    if status == "RUNNING":
        return (f"run {run_id} is still RUNNING and has no model at {path or '/'} yet (no MLmodel file there{named}): "
                f"wait for it to finish, evaluate its model, then register it")
    if status in ("FAILED", "KILLED"):
        return f"run {run_id} ended {status} with no model at {where}"
    return f"run {run_id} has no model at {where}"


def registered_model_id(model_uri: str) -> str | None:
    """The logged model behind a registry URI (`models:/name@alias`, `models:/name/3`, `models:/name/latest`, a stage),
    or None: an evaluation of `@champion` lands on the champion's logged model too, where register reads it. Read as
    MLflow reads the URI to load it (`get_model_name_and_version`)."""
    if not model_uri.startswith("models:/") or model_id(model_uri):
        return None
    client = mlflow.MlflowClient()
    try:
        found = get_model_name_and_version(client, model_uri)  # (name, version), or (id,) for models:/<id>
        version = client.get_model_version(*found) if len(found) == 2 else None
    except MlflowException:
        return None
    if version is None:
        return None
    return getattr(version, "model_id", None) or model_id(version.source)  # MLflow 3.17 leaves model_id unset


# ---------------------------------------------------------------- compare

def experiment_meant(name: str) -> str:
    """A hint for an experiment name no experiment has: the name of the experiment whose id it is (MLflow's CLI takes
    ids), else the closest name, in any letter case; '' if none."""
    client = mlflow.MlflowClient()
    if name.isdigit():
        with contextlib.suppress(MlflowException):
            return f"; experiment {name} is {client.get_experiment(name).name!r}: give its name"
    names = {e.name.lower(): e.name for e in client.search_experiments()}
    close = difflib.get_close_matches(name.lower(), list(names), n=1, cutoff=0.7)
    return f"; did you mean {names[close[0]]!r}?" if close else ""


def find_experiment_id(name: str) -> str:
    """Experiment name -> id; ConfigError if there is none of that name, or it is in MLflow's trash (its runs are
    too: the search found none, and said the experiment held no finished training runs)."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        raise config.ConfigError(f"experiment: no experiment named {name!r}{experiment_meant(name)}")
    if experiment.lifecycle_stage == "deleted":
        raise config.ConfigError(f"experiment: {name!r} is in MLflow's trash; restore it (mlflow experiments restore "
                                 f"--experiment-id {experiment.experiment_id}) or name another")
    return experiment.experiment_id


def check_comparison_experiment(experiment: str | None) -> None:
    """ConfigError if the comparison run would go to an experiment whose artifacts go to a local folder this user
    cannot write (`unwritable_artifact_location`: `mlruns` a file, say), where the run died on MLflow's
    NotADirectoryError traceback as the table was logged, FAILED: `experiment` (param `experiment`, checked by
    `find_experiment_id` already; open_run's check named `tracking.experiment`, no param of compare), or where none
    is named MLflow's default one (MLFLOW_EXPERIMENT_NAME, MLFLOW_EXPERIMENT_ID, else `Default`), which is also
    refused in MLflow's trash (MLflow refused to open a run in it: a traceback) or where MLFLOW_EXPERIMENT_ID names
    no experiment (a traceback too), MLFLOW_EXPERIMENT_NAME is empty or names another experiment than
    MLFLOW_EXPERIMENT_ID (tracebacks); one MLFLOW_EXPERIMENT_NAME names that does not exist yet is left to be made as
    the run opens. Nothing to check under `mlflow run`
    (its run is open already, in its own experiment) or inside an active run."""
    if mlflow.active_run() is not None or os.environ.get("MLFLOW_RUN_ID"):
        return
    if experiment:
        found = mlflow.get_experiment(find_experiment_id(experiment))
        if unwritable := unwritable_artifact_location(found.artifact_location or ""):
            raise config.ConfigError(
                f"experiment: {experiment!r} keeps its artifacts in {unwritable[0]}, where this user cannot write: "
                f"{unwritable[1]}; make it a folder this user may write, or name another experiment")
        return
    # the experiment `mlflow.start_run` picks where none is named
    default = "experiment: none named, so the comparison run goes to MLflow's default experiment"
    name, given_id = os.environ.get("MLFLOW_EXPERIMENT_NAME"), os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not mlflow.tracking.fluent._active_experiment_id and name is not None:  # what MLflow reads first
        if not name:  # MLflow's traceback: Invalid experiment name: ''
            raise config.ConfigError(f"{default}, and MLFLOW_EXPERIMENT_NAME is set but empty; name one "
                                     "(-P experiment=), or set MLFLOW_EXPERIMENT_NAME to an experiment's name or "
                                     "unset it")
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            return  # MLflow makes it as the run opens; looked up through MLflow, it was made for a comparison refused
        if given_id and given_id != found.experiment_id:  # MLflow's error said only that they did not match
            try:
                other = f"experiment {mlflow.get_experiment(given_id).name!r}"
            except MlflowException:
                other = "no experiment"
            raise config.ConfigError(
                f"{default}, and MLFLOW_EXPERIMENT_NAME={name!r} (experiment {found.experiment_id}) and "
                f"MLFLOW_EXPERIMENT_ID={given_id} ({other}) disagree; name one (-P experiment=), or unset one of the "
                "two")
    try:
        experiment = mlflow.get_experiment(mlflow.tracking.fluent._get_experiment_id())
    except MlflowException:  # MLFLOW_EXPERIMENT_ID naming none: MLflow's traceback, once every run was read
        if not given_id:
            raise
        raise config.ConfigError(
            f"{default}, and MLFLOW_EXPERIMENT_ID={given_id} names no experiment; name one "
            f"(-P experiment=) or set MLFLOW_EXPERIMENT_ID to an experiment's id") from None
    named = f"{default} {experiment.name!r}"
    if experiment.lifecycle_stage == "deleted":
        raise config.ConfigError(
            f"{named}, which is in MLflow's trash; restore it (mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}) or set MLFLOW_EXPERIMENT_NAME to another")
    if unwritable := unwritable_artifact_location(experiment.artifact_location or ""):
        raise config.ConfigError(
            f"{named}, which keeps its artifacts in {unwritable[0]}, where this user cannot write: {unwritable[1]}; "
            f"make it a folder this user may write, or set MLFLOW_EXPERIMENT_NAME to another")


OTHER_PROJECT = "of another project: none of this pipeline's params"
# Why a run tagged step = 'train' that logged no params at all is no training run to compare: one made by hand (the
# tag set in the UI, a script), or a start that failed before its params were logged.
NO_PARAMS = "no params logged: made by hand, or a start that failed before it logged them"


def of_another_project(params: dict[str, str]) -> bool:
    """Whether a run tagged step = 'train' is another project's that shares the store and the tag: it logged params,
    none of them this pipeline's (`config.default_params`). A run with no params at all is not told apart."""
    return bool(params) and not set(params) & set(config.default_params())


def row_params(run: pd.Series) -> dict[str, str]:
    """The params of a run as a row of `mlflow.search_runs` holds them (`params.*` columns, NaN where not logged)."""
    return {c.removeprefix("params."): v for c, v in run.items() if c.startswith("params.") and isinstance(v, str)}


# Run ids a refusal names, each with why it is no finished training run: the first of them, then how many more (ids
# of another store: thousands, each looked up, in one line)
MISSING_NAMED = 10
# Run ids per search: MLflow parses a filter of at most 10,000 tokens (sqlparse's limit), about 3,300 ids in one IN list
RUN_IDS_PER_SEARCH = 1000


def search_train_runs(experiment: str | None, run_ids: list[str]) -> pd.DataFrame:
    """Finished training runs (tag step = 'train') as `mlflow.search_runs` returns them, newest first; none of another
    project (`of_another_project`: how many, in `.attrs["other_project"]`), none without params (NO_PARAMS: how
    many, in `.attrs["no_params"]`: a row of empty params compared as a run of the defaults); without run ids, none
    tagged `superseded_by_retry` (a sweep's trial queued again, whose retry's train run counts instead).

    Inputs: an experiment name (None: every experiment) and optional run ids to keep. Output: one row
    per run, columns `run_id`, `params.*`, `metrics.*`, `tags.*`, `start_time`, `end_time`, `experiment_id`,
    `experiment_name`. ConfigError if nothing matches, a run id is malformed or a named run is not a training run.
    """
    # Checked before they go into the filter string, where a quote would make MLflow fail on its syntax.
    malformed = [r for r in run_ids if len(r) != 32 or set(r) - set("0123456789abcdef")]
    if malformed:
        raise config.ConfigError(f"run_ids: not a run id (32 lowercase hex characters): "
                                 f"{', '.join(map(repr, malformed))}")
    run_ids = list(dict.fromkeys(run_ids))
    scope = {"experiment_ids": [find_experiment_id(experiment)]} if experiment else {"search_all_experiments": True}
    where = "tags.step = 'train' and attributes.status = 'FINISHED'"
    batches = [run_ids[i:i + RUN_IDS_PER_SEARCH] for i in range(0, len(run_ids), RUN_IDS_PER_SEARCH)]
    found = []
    for batch in batches or [[]]:
        listed = f" and attributes.run_id IN ({', '.join(map(repr, batch))})" if batch else ""
        found.append(mlflow.search_runs(filter_string=where + listed, order_by=["attributes.start_time DESC"], **scope))
    found = [runs for runs in found if len(runs)]
    runs = (pd.concat(found, ignore_index=True).sort_values("start_time", ascending=False, kind="stable")
            .reset_index(drop=True) if found else pd.DataFrame())
    other = runs.apply(lambda run: of_another_project(row_params(run)), axis=1).astype(bool) if len(runs) else []
    bare = runs.apply(lambda run: not row_params(run), axis=1).astype(bool) if len(runs) else []
    other_project, no_params = int(sum(other)), int(sum(bare))
    if other_project or no_params:
        runs = runs[~(other | bare)].reset_index(drop=True)
    if not run_ids and "tags.superseded_by_retry" in runs:  # a sweep's trial queued again: its retry's run counts
        runs = runs[runs["tags.superseded_by_retry"] != "true"].reset_index(drop=True)
    missing = sorted(set(run_ids) - set(runs["run_id"])) if len(runs) else sorted(run_ids)
    if missing:
        more = f", and {len(missing) - MISSING_NAMED} more" if len(missing) > MISSING_NAMED else ""
        raise config.ConfigError(f"run_ids: not finished training runs{' of ' + experiment if experiment else ''}: "
                                 + ", ".join(f"{r} ({why})" if (why := why_not_compared(r, experiment)) else r
                                             for r in missing[:MISSING_NAMED]) + more)
    if runs.empty:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        unfinished = unfinished_counts(unfinished_train_runs(experiment))
        notes = [f"not finished: {unfinished}"] * bool(unfinished) + [
            f"left out: {other_project} of another project"] * bool(other_project) + [
            f"left out: {no_params} without params"] * bool(no_params)
        raise config.ConfigError(f"experiment: no finished training runs (tag step='train') in {where}"
                                 + "".join(f" ({note})" for note in notes))
    runs.attrs["other_project"], runs.attrs["no_params"] = other_project, no_params
    client = mlflow.MlflowClient()
    names = {found: client.get_experiment(found).name for found in runs["experiment_id"].unique()}
    runs["experiment_name"] = runs["experiment_id"].map(names)
    return runs


# A run's status where train failed it on a NaN or infinite loss (its failure_reason is `fitting.diverged`'s line)
DIVERGED = "diverged"


def run_status(run) -> str:
    """A run's status, DIVERGED for a training run failed by its loss going NaN or infinite: its FAILED alone said
    nothing of why, counted with runs stopped by a disk or a bug."""
    reason = run.data.tags.get("failure_reason", "")
    return DIVERGED if run.info.status == "FAILED" and reason.startswith("training diverged") else run.info.status


def unfinished_counts(counts: dict[str, int]) -> str:
    """`unfinished_train_runs`'s counts in words, diverged ones first: "2 diverged, 1 FAILED, 1 RUNNING"."""
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda c: (c[0] != DIVERGED, c[0])))


def unfinished_train_runs(experiment: str | None) -> dict[str, int]:
    """How many training runs (of `experiment`, else of every experiment) `search_train_runs` leaves out as not
    FINISHED, by status (RUNNING: still training, or left so by a kill; FAILED; KILLED; DIVERGED: failed on a NaN
    loss, `run_status`), but a sweep's pruned trials (tag `pruned_at_epoch`: stopped early by design), its trials
    queued again (`superseded_by_retry`) and runs of another project (`of_another_project`)."""
    where = "tags.step = 'train' and attributes.status != 'FINISHED'"
    scope = ({"experiment_ids": [find_experiment_id(experiment)]} if experiment else {"search_all_experiments": True})
    runs = mlflow.search_runs(filter_string=where, output_format="list", **scope)
    counts: dict[str, int] = {}
    for run in runs:
        if ("pruned_at_epoch" not in run.data.tags and run.data.tags.get("superseded_by_retry") != "true"
                and not of_another_project(run.data.params)):
            counts[run_status(run)] = counts.get(run_status(run), 0) + 1
    return counts


def why_not_compared(run_id: str, experiment: str | None) -> str:
    """Why `search_train_runs` did not find run `run_id` among the finished training runs (of `experiment`): no such
    run, in MLflow's trash (it or its experiment), of another experiment, step or project, or not FINISHED; "" if none
    of these (it finished since)."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return "no run of that id"
    found = client.get_experiment(run.info.experiment_id)
    if found.lifecycle_stage == "deleted":
        return (f"its experiment {found.name!r} is in MLflow's trash: mlflow experiments restore --experiment-id "
                f"{found.experiment_id}")
    if run.info.lifecycle_stage == "deleted":
        return f"in MLflow's trash: mlflow runs restore --run-id {run_id}"
    if experiment and found.name != experiment:
        return f"of experiment {found.name!r}"
    if (step := run.data.tags.get("step")) != "train":
        # a pipeline's or a sweep trial's run, above its train run, or the one `mlflow run` opened for a resume
        if trained := run.data.tags.get("train_run_id") or run.data.tags.get("resumes_run"):
            return f"a run of step {step!r}: give its training run, {trained}"
        return f"a run of step {step!r}" if step else "no step's run (no tag step)"
    if of_another_project(run.data.params):
        return OTHER_PROJECT
    if not run.data.params:
        return NO_PARAMS
    if run_status(run) == DIVERGED:
        return f"{DIVERGED}: {run.data.tags['failure_reason']}"
    return run.info.status if run.info.status != "FINISHED" else ""


def log_comparison(params: dict, run_ids: list[str], description: str, files: Path) -> None:
    """Record a comparison on the active run: the files in folder `files` as artifacts (written before the run
    opened), its `params`, artifact `compared_runs.txt` (the run ids, one a line), tags `compared_runs` (the ids, comma
    separated, where they fit a tag, else how many and where they are) and `compared_runs_count`, its description."""
    mlflow.log_artifacts(str(files))
    mlflow.log_params(params)
    mlflow.log_text("".join(f"{r}\n" for r in run_ids), "compared_runs.txt")
    # MLflow cut the list at its tag limit (~240 ids, the last one partial) with only a log line to say so
    listed = ",".join(run_ids)
    if len(listed) > MAX_TAG_VAL_LENGTH:
        listed = f"{len(run_ids)} runs, too many for this tag: see artifact compared_runs.txt"
    mlflow.set_tags({"compared_runs": listed, "compared_runs_count": str(len(run_ids)),
                     "mlflow.note.content": fit_note(description, "runs.md")})


# ---------------------------------------------------------------- main

def log_pipeline_results(dataset_uri: str, model_uri: str, metrics: dict, decision: dict) -> None:
    """The headline results on the `main` parent run: test metrics (and how many images, and how many of them the
    model was trained on), the URIs, the registered version."""
    mlflow.log_metrics({key: metrics[key] for key in ("test_acc", "test_loss", "test_images", "test_images_in_train")})
    mlflow.set_tags({"dataset_uri": dataset_uri, "model_uri": model_uri,
                     "registered_version": str(decision["version"]),
                     "alias_moved": str(decision["alias_moved"]).lower()})
