"""The Model Registry side of the tracking layer: what `register` reads and writes.

`model_score` reads one evaluation of a logged model (evaluate logs test_acc, per-class scores and the test split's
digest for it), of any test split or of one (a champion's score on a challenger's test data); `model_test_acc` the
newest, for register; `version_score` that of a registered version (`tagged_test_acc`: its tag, where a number);
`current_champion` finds the version holding an alias; `register_version` adds a version;
`same_score_version` finds the version a register of the same model and score wrote, `weighed_champion` the
champion its report weighed it against;
`move_alias` and `settle_alias` place the alias; `log_decision` and `record_report` store
the decision and the champion-vs-challenger report on the register run and the version.
Versions are MLflow `ModelVersion` entities: register reads their `version`, `tags`, `model_id`
and `source` only; register tags each with `test_acc`, `run_id`, `evaluate_run_id`, `test_data_sha256` and
`test_images_in_train`, and with the `alias` it was weighed for and the register run that created it
(`register_run_id`), its report's `champion_version`,
`champion_evaluate_run_id`, `test_acc_difference`, `alias_moved` and `decision`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.store.artifact.utils.models import _parse_model_uri
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from pipeline import config
from pipeline.tracking import (
    TEST_DATA_TAG,
    finished_run,
    given_param,
    latest_metrics,
    log_params,
    model_id,
    written_despite_a_race,
)
from pipeline.tracking.steps import in_trash

EVALUATE_RUN_TAG = "evaluate_run_id"  # on a version: the evaluate run whose score register compared
CHAMPION_EVALUATE_RUN_TAG = "champion_evaluate_run_id"  # on a version: that of the champion's score it was weighed by
DECISION_TAG = "decision"  # on a version: why the alias moved or not; written last, when register is done
ALIAS_TAG = "alias"  # on a version: the alias its register weighed it for (`register.alias`)
REGISTER_RUN_TAG = "register_run_id"  # on a version: the register run that created it
# evaluate's metric, and a version's tag: how many of the test images its test_acc counts the model was trained on
IN_TRAIN = "test_images_in_train"
DESCRIPTION_CHARS = 5000  # MLflow's column for a version's description: PostgreSQL refuses a longer one


@dataclasses.dataclass(frozen=True)
class Score:
    """One evaluation of a logged model, as evaluate recorded it: `test_acc` (None: never evaluated), every metric
    of that evaluate run on the model (`test_acc_<class>` too), the digest of its test split, the evaluate run,
    the run that trained the model and the dataset URI the evaluate run read (its param `dataset_uri`; None where
    it records none)."""

    test_acc: float | None
    metrics: dict[str, float]
    test_data: str | None = None
    evaluate_run: str | None = None
    source_run: str | None = None
    dataset_uri: str | None = None

    @property
    def in_train(self) -> int | None:
        """How many of the scored test images the model was trained on (None: evaluated before it was counted)."""
        return int(self.metrics[IN_TRAIN]) if IN_TRAIN in self.metrics else None

    @property
    def test_images(self) -> int | None:
        """How many test images it was measured on (evaluate's `test_images`; None: not recorded)."""
        return int(self.metrics["test_images"]) if "test_images" in self.metrics else None


def model_score(model_uri: str | None, *, tagged_acc: str | None = None, evaluate_run: str | None = None,
                test_data: str | None = None) -> Score:
    """The evaluation of the logged model `models:/m-...` that `evaluate_run` made; else the newest whose
    test_acc, as register tags it (6 decimals), is `tagged_acc`; else the newest. Each evaluate run logs its
    metrics on the model, so one evaluation's metrics never mix with another's (a class absent from a later,
    smaller test split keeps no score from an earlier one). With `test_data`, of the evaluations of the test split
    of that digest only (an evaluate run's tag `test_data_sha256`): the model's score on those test images.
    Score(None, {}) for an unknown or unevaluated model."""
    found = model_id(model_uri)
    try:
        model = mlflow.get_logged_model(found) if found else None
    except MlflowException:
        model = None  # deleted, or in a store this client cannot see
    return _evaluation(model, tagged_acc, evaluate_run, test_data) if model else Score(None, {})


def _evaluation(model, tagged_acc: str | None = None, evaluate_run: str | None = None,
                test_data: str | None = None) -> Score:
    """`model_score` of a LoggedModel entity. Only evaluate runs that finished count (`finished_run`): one that
    failed or was killed after scoring (an artifact upload lost), one still running, or one deleted is no evaluation."""
    by_run: dict[str, list] = {}
    for metric in model.metrics or []:
        by_run.setdefault(metric.run_id, []).append(metric)
    runs = {run: found for run, metrics in by_run.items()
            if any(m.key == "test_acc" for m in metrics) and (found := finished_run(run)) is not None
            and (test_data is None or found.data.tags.get(TEST_DATA_TAG) == test_data)}
    evaluations = sorted(((max(m.timestamp for m in by_run[run] if m.key == "test_acc"), run,
                           latest_metrics(by_run[run], {run: runs[run].data})) for run in runs),
                         key=lambda e: e[0], reverse=True)
    chosen = ([e for e in evaluations if e[1] == evaluate_run]
              or [e for e in evaluations if tagged_acc is not None and f"{e[2]['test_acc']:.6f}" == tagged_acc]
              or evaluations)
    if not chosen:
        return Score(None, {}, source_run=model.source_run_id)
    _, run, metrics = chosen[0]
    # evaluate tags its run with the test split's digest; the model's tag is that of its latest evaluation
    test_data = runs[run].data.tags.get(TEST_DATA_TAG) or (model.tags or {}).get(TEST_DATA_TAG)
    return Score(float(metrics["test_acc"]), metrics, test_data, run, model.source_run_id,
                 given_param(runs[run].data.params.get("dataset_uri", "")) or None)


def model_test_acc(model_uri: str) -> Score:
    """The newest evaluation of a logged model (`model_score`); ConfigError naming `model_uri` where the URI is
    not `models:/m-...` of a model in this store, or evaluate has not scored it, or its test_acc is no accuracy in
    [0, 1] (`is_accuracy`: logged by another tool, a percentage, NaN), or its files are gone (`model_gone`)."""
    logged_model = model_id(model_uri)
    if logged_model is None:
        raise config.ConfigError(f"model_uri: expected a logged model URI models:/m-..., got {model_uri!r}")
    try:
        model = mlflow.get_logged_model(logged_model)
    except MlflowException as exc:
        raise config.ConfigError(f"model_uri: no logged model {logged_model} ({exc.message})") from None
    score = _evaluation(model)
    if score.test_acc is None:  # an evaluate run that failed, was killed or deleted does not count
        raise config.ConfigError(f"model_uri: {model_uri} has no test_acc from an evaluate run that finished: "
                                 f"{_unfinished_evaluation(model)}")
    if math.isnan(score.test_acc):  # read as 0.0 from the logged model, it was a score of 0
        raise config.ConfigError(f"model_uri: {model_uri} has test_acc NaN (logged by run {score.evaluate_run}), as a "
                                 f"diverged model's score is: train it again with a lower train.lr")
    if not is_accuracy(score.test_acc):  # a percentage won every comparison after it
        raise config.ConfigError(f"model_uri: {model_uri} has test_acc {score.test_acc:g}, no accuracy in [0, 1] "
                                 f"(logged by run {score.evaluate_run}, not by evaluate, whose scores lie there); "
                                 f"score it with evaluate, then register it")
    if gone := model_gone(model_uri):  # a version of it would take the alias, and serve nothing
        raise config.ConfigError(f"model_uri: {model_uri} cannot be registered: {gone} (nothing to load or serve); "
                                 f"train it again")
    return score


def is_accuracy(value: float | None) -> bool:
    """Whether `value` is an accuracy, a number in [0, 1] (not NaN, inf or a percentage)."""
    return value is not None and 0 <= value <= 1  # NaN is neither


def _unfinished_evaluation(model) -> str:
    """What to do about a logged model that no finished evaluate run scored: wait for its newest evaluate run, still
    running, or evaluate it (again, where that run failed, was killed or deleted)."""
    scored = [metric for metric in model.metrics or [] if metric.key == "test_acc"]
    if not scored:
        return "run evaluate on it first"
    run_id = max(scored, key=lambda metric: metric.timestamp).run_id
    try:
        run = MlflowClient().get_run(run_id)
        status = "deleted" if run.info.lifecycle_stage == "deleted" else run.info.status
    except MlflowException:
        status = "deleted"
    hint = "wait for it to finish" if status == "RUNNING" else "run evaluate on it again"
    return f"its newest evaluate run {run_id} is {status}; {hint}"


def versionless_uri_error(model_uri: str, name: str) -> config.ConfigError:
    """The one line for `models:/<name>`, a registered model's name without a version, alias or /latest, whichever
    step meets it."""
    return config.ConfigError(f"model_uri: {model_uri} names a registered model but no version of it; give "
                              f"models:/{name}/<version>, models:/{name}@<alias> or models:/{name}/latest")


def check_names_version(model_uri: str) -> None:
    """ConfigError (versionless_uri_error) for `models:/<name>` (a slash after it or not) that is no logged model's
    id `m-...`: MLflow reads one word there as a logged model's id, and said "Logged model with ID '<name>' not
    found"."""
    name = model_uri.removeprefix("models:/").rstrip("/")
    if model_uri.startswith("models:/") and name and not name.startswith("m-") and not {"/", "@"} & set(name):
        raise versionless_uri_error(model_uri, name)


def registry_version(model_uri: str):
    """The model version a registry URI names (`models:/name/3`, `models:/name@alias`, `models:/name/latest`, a
    stage), read once, as MLflow reads it to load the model; None for other URIs (`models:/m-...`, `runs:/...`).
    ConfigError naming what is not there: the registered model, the version, a version holding the alias or in
    the stage; and for `models:/<name>`, which names no version (check_names_version)."""
    if not isinstance(model_uri, str) or not model_uri.startswith("models:/") or model_id(model_uri):
        return None
    check_names_version(model_uri)
    try:
        parsed = _parse_model_uri(model_uri)
    except MlflowException:
        return None  # no URI MLflow reads: the caller's check names it
    client, name = MlflowClient(), parsed.name
    if parsed.model_id is not None:  # models:/<one word>: a logged model's id to MLflow, or a registered model's name
        try:
            client.get_registered_model(parsed.model_id)
        except MlflowException:
            return None  # no registry URI: the caller's check names it
        raise versionless_uri_error(model_uri, parsed.model_id)  # a registered model named m-...
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise config.ConfigError(f"model_uri: {model_uri}: no registered model {name!r}") from None
    try:
        if parsed.version is not None:
            return client.get_model_version(name, parsed.version)
        if parsed.alias is not None:
            return client.get_model_version_by_alias(name, parsed.alias)
    except MlflowException:
        missing = (f"{name} has no version {parsed.version}" if parsed.version is not None
                   else f"no version of {name} holds @{parsed.alias}" if parsed.alias is not None
                   else f"no version of {name} is in stage {parsed.stage}")
        raise config.ConfigError(f"model_uri: {model_uri}: {missing}") from None
    # the newest version (in the stage): as MLflow's deprecated get_latest_versions, which warns on every call
    latest = [version for version in versions(name)
              if parsed.stage is None or version.current_stage.lower() == parsed.stage.lower()]
    if not latest:
        where = "" if parsed.stage is None else f" is in stage {parsed.stage}"
        raise config.ConfigError(f"model_uri: {model_uri}: no version of {name}{where}")
    return max(latest, key=lambda version: int(version.version))


def version_model_uri(version) -> str:
    """A model version's logged model URI `models:/m-...` (its `source` for versions registered otherwise)."""
    return f"models:/{version.model_id}" if getattr(version, "model_id", None) else version.source


def model_gone(model_uri: str) -> str | None:
    """Why the logged model `models:/m-...` (a version's) can no longer be loaded: deleted from the tracking store
    (`MlflowClient.delete_logged_model`; its artifacts go at the next `mlflow gc`), or its artifacts gone (no MLmodel
    file: removed by hand, or by `mlflow gc`); None where it is there, and for a URI that is no logged model's (a
    version registered from a path). A store or artifact store that fails to answer raises: that is no model gone."""
    found = model_id(model_uri)
    if found is None:
        return None
    client = MlflowClient()
    try:
        client.get_logged_model(found)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return f"logged model {found} is deleted from the tracking store"
    if not any(info.path == "MLmodel" for info in client.list_logged_model_artifacts(found)):
        return "its artifacts are gone: no MLmodel file"
    return None


def trashed_training_run(model_uri: str) -> str | None:
    """The id of the run that logged the model `models:/m-...` (a version's) where that run is in MLflow's trash (its
    artifacts kept until `mlflow gc`): a model its user discarded, which register refuses as a challenger and does not
    weigh as a champion; None otherwise, and for a URI that is no logged model's."""
    found = model_id(model_uri)
    try:
        run_id = MlflowClient().get_logged_model(found).source_run_id if found else None
    except MlflowException:
        return None  # no such model: `model_gone` says so
    return run_id if in_trash(run_id) else None


def tagged_test_acc(version) -> float | None:
    """A version's `test_acc` tag as a number; None where it has none, or one that is no accuracy in [0, 1] (edited by
    hand: empty, text, NaN, a percentage), which would fail every register or win or lose every comparison."""
    try:
        value = float((version.tags or {})["test_acc"])
    except (KeyError, ValueError):
        return None
    return value if is_accuracy(value) else None


def version_score(version) -> Score:
    """A model version's score: its `test_acc` tag (register's, 6 decimals) and the evaluation it came from; for a
    version registered by hand, without the tag (or with one that is no accuracy, `tagged_test_acc`), its logged
    model's newest evaluation (rounded alike). Where no evaluation of the model has the tagged score (its evaluate run
    deleted), no metrics and no evaluate run: the newest is another score, perhaps on other test data."""
    tags = version.tags or {}
    tagged = tagged_test_acc(version)
    score = model_score(version_model_uri(version), tagged_acc=tags["test_acc"] if tagged is not None else None,
                        evaluate_run=tags.get(EVALUATE_RUN_TAG))
    if tagged is not None:
        matched = score.test_acc is not None and f"{score.test_acc:.6f}" == tags["test_acc"]
        return Score(tagged, score.metrics if matched else {},
                     tags.get(TEST_DATA_TAG, score.test_data if matched else None),
                     score.evaluate_run if matched else None, score.source_run)
    return dataclasses.replace(score, test_acc=None if score.test_acc is None else round(score.test_acc, 6))


def current_champion(name: str, alias: str):
    """The version of registered model `name` that holds `alias`, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None  # no registered model of that name yet, or no version holds the alias


def versions(name: str) -> list:
    """Every version of registered model `name` (none if there is no such model)."""
    return MlflowClient().search_model_versions(f"name = '{name}'")


def registered_before(name: str, alias: str) -> tuple[int, frozenset[str]]:
    """What a register starting now finds of registered model `name`: the highest version number (0 if none), and the
    versions up to it that a register for `alias` running alongside created and has not finished (no `decision` tag;
    its register run, tag `register_run_id`, still RUNNING), which may place the alias at any time from now
    (`settle_alias`). Not one whose register was stopped (its run ended KILLED or FAILED; a rerun finishes it)."""
    found = versions(name)
    unfinished = frozenset(str(v.version) for v in found if "test_acc" in v.tags and DECISION_TAG not in v.tags
                           and v.tags.get(ALIAS_TAG, alias) == alias and _running(v.tags.get(REGISTER_RUN_TAG)))
    return max((int(v.version) for v in found), default=0), unfinished


def _running(run_id: str | None) -> bool:
    """Whether run `run_id` is still RUNNING (and not deleted)."""
    try:
        run = MlflowClient().get_run(run_id) if run_id else None
    except MlflowException:
        return False
    return run is not None and run.info.status == "RUNNING" and run.info.lifecycle_stage == "active"


def register_version(model_uri: str, name: str, tags: dict[str, str], *, description: str | None = None):
    """Register `model_uri` as a new version of `name` (created if new), tagged `tags` and with the active run's id
    (`register_run_id`); (the ModelVersion, True).

    The version is created with its tags and `description` in one write, so no kill leaves it without them
    (`mlflow.register_model` takes no description). The logged model lists the version in its
    `mlflow.modelVersions` tag, as `mlflow.register_model` records it for the UI (`list_versions_on_model`: with
    those of registers of it under other names alongside). Failures raise.

    Two registers of the same model and score for the same alias started together each find no version of it
    (`same_score_version`) and each create one: the version created second, seeing the first (`_same_score`, lower
    numbered), is deleted again, and (that first version, False) returned. The registry refuses no duplicate itself.
    """
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    logged_model = model_id(model_uri)
    if active := mlflow.active_run():  # the register run creating it (`registered_before`)
        tags = {**tags, REGISTER_RUN_TAG: active.info.run_id}
    version = client.create_model_version(name, model_uri, tags=tags, description=fit_description(description),
                                          model_id=logged_model)
    first = min((v for v in versions(name) if _same_score(v, model_uri, tags)), key=lambda v: int(v.version),
                default=version)
    if int(first.version) < int(version.version):  # a register alongside created it first: this one is none
        client.delete_model_version(name, version.version)
        if logged_model:  # a tracking server listed it on the model as it created it
            list_versions_on_model(logged_model, dropped=(name, version.version))
        return first, False
    if logged_model:  # the UI's link from the logged model to its versions; the version itself is whole already
        list_versions_on_model(logged_model)
    return version, True


LISTING_ATTEMPTS = 20  # writes of a model's version list, each after a register alongside overwrote this one's


def list_versions_on_model(logged_model: str, dropped: tuple[str, str | int] | None = None) -> None:
    """List every registered version of the logged model `logged_model` in its `mlflow.modelVersions` tag (the UI's
    link from the model to its versions, which `mlflow.register_model` and a tracking server's create-version write),
    keeping the entries there (once each) but `dropped` (name, version): a version deleted again.

    That tag is read, then written whole: two registers of one model under other names at once each wrote what they
    had read with their own version added, and the second dropped the first's. So the versions to list are those the
    registry holds of the model (found by its run, `run_id`), and the tag is read again after writing and written
    again until it lists them all: the last register to write sees every version created before it. An entry whose
    version is gone is dropped: a register alongside may delete its duplicate just after this one read the registry
    (`register_version`), and this one's write would otherwise list it for good."""
    client = MlflowClient()
    source_run = client.get_logged_model(logged_model).source_run_id
    gone = None if dropped is None else (dropped[0], str(dropped[1]))
    for _ in range(LISTING_ATTEMPTS):
        tagged = client.get_logged_model(logged_model).tags.get(MLFLOW_MODEL_VERSIONS)
        listed = json.loads(tagged or "[]")
        registered = [{"name": v.name, "version": v.version} for v in sorted(
            client.search_model_versions(f"run_id = '{source_run}'") if source_run else [],
            key=lambda v: (v.name, int(v.version))) if version_model_uri(v) == f"models:/{logged_model}"]
        found = {(v["name"], str(v["version"])) for v in registered}
        wanted, seen = [], set()
        for entry in [*listed, *registered]:
            key = (entry.get("name"), str(entry.get("version")))
            if key != gone and key not in seen and (key in found or _version_exists(*key)):
                seen.add(key)
                wanted.append(entry)
        if wanted == listed and tagged is not None or not wanted and tagged is None:
            return
        client.set_logged_model_tags(logged_model, {MLFLOW_MODEL_VERSIONS: json.dumps(wanted)})
    print(f"warning: the versions of {logged_model} may not all be listed in its {MLFLOW_MODEL_VERSIONS} tag "
          f"(registers of it alongside kept rewriting it); each version is registered whole")


def _version_exists(name: str | None, version: str) -> bool:
    """Whether registered model `name` has version `version` (a store that fails to answer raises; an entry without
    a name names none)."""
    if not name:
        return False
    try:
        MlflowClient().get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise
    return True


def fit_description(markdown: str | None) -> str | None:
    """`markdown` as a version's description: whole, or its first lines that fit `DESCRIPTION_CHARS` and a line
    saying so (a per-class table of ~70 classes is longer; the register run's artifacts keep it whole)."""
    if markdown is None or len(markdown) <= DESCRIPTION_CHARS:
        return markdown
    note = "\n(cut to fit a version's description: the whole report is the register run's champion_vs_challenger.md)\n"
    return markdown[:DESCRIPTION_CHARS - len(note)].rpartition("\n")[0] + note


def same_score_version(name: str, model_uri: str, tags: dict[str, str], *, finished: bool):
    """The version of `name` that a register of `model_uri` with the same score (`tags`' test_acc and test data)
    for the same alias (`tags`' alias; a version from before that tag matches any) created and finished
    (`finished`), or was stopped (killed, Ctrl-C) before recording its decision; None if there is none. A rerun
    finishes an unfinished one, and registers nothing again where one is finished (a `main` that failed after its
    register, rerun), rather than registering the model a second time. A register for another alias is no rerun
    (taken for one, `register.alias=staging` was never placed on a model registered for @champion)."""
    return next((v for v in sorted(versions(name), key=lambda v: int(v.version))
                 if _same_score(v, model_uri, tags) and (DECISION_TAG in v.tags) == finished), None)


def _same_score(version, model_uri: str, tags: dict[str, str]) -> bool:
    """Whether `version` registers `model_uri` with the score (test_acc, test data) and for the alias of `tags` (a
    version from before the alias tag: for any)."""
    return (version_model_uri(version) == model_uri and "test_acc" in version.tags
            and all(version.tags.get(key) == tags.get(key) for key in ("test_acc", TEST_DATA_TAG))
            and version.tags.get(ALIAS_TAG, tags.get(ALIAS_TAG)) == tags.get(ALIAS_TAG))


def weighed_champion(name: str, version) -> tuple:
    """The champion that the report of `version` (a version of `name` whose register was stopped before it finished)
    weighed it against: (its ModelVersion, the score it was weighed by, the score it was registered with where that
    is another: its model's evaluation `champion_evaluate_run_id` on the challenger's test data), from the version's
    tags `champion_version` and `champion_evaluate_run_id`; (None, None, None) where no version held the alias or that
    one is gone. What the rerun reports, not the version itself that holds the alias now."""
    tags = version.tags or {}
    try:
        champion = MlflowClient().get_model_version(name, tags["champion_version"])
    except (KeyError, MlflowException):
        return None, None, None
    held = version_score(champion)
    weighed_by = tags.get(CHAMPION_EVALUATE_RUN_TAG)
    if weighed_by and weighed_by != held.evaluate_run:  # scored on the challenger's test data by that evaluate run
        rescored = model_score(version_model_uri(champion), evaluate_run=weighed_by)
        if rescored.evaluate_run == weighed_by:
            return champion, dataclasses.replace(rescored, test_acc=float(f"{rescored.test_acc:.6f}")), held
    return champion, held, None


def move_alias(name: str, alias: str, version: str | int) -> None:
    """Point `alias` of registered model `name` at `version`. Where no version holds it, two registers placing it at
    once can both insert it (MLflow's SQL store reads, then inserts): the one whose insert the database refuses as a
    duplicate sets it again, which updates it (`settle_alias` then weighs the two versions)."""
    written_despite_a_race(lambda: MlflowClient().set_registered_model_alias(name, alias, version))


def comparable(a: str | None, b: str | None) -> bool:
    """Whether scores measured on test splits of digests `a` and `b` compare (an unknown one, from a model
    evaluated before the digest was recorded, compares with any)."""
    return a is None or b is None or a == b


def same_test_data(a: Score, b: Score) -> bool:
    """Whether scores `a` and `b` were measured on the same test split, as far as is known: by their digests where both
    have one (`comparable`); else by their numbers of test images where both have one (a score on 1,280 images, made
    before evaluate recorded digests or by hand, says nothing against one on 10,000); else taken as the same."""
    if a.test_data and b.test_data:
        return a.test_data == b.test_data
    return a.test_images is None or b.test_images is None or a.test_images == b.test_images


def test_data_difference(challenger: Score, champion: Score, version) -> str:
    """How the test data of two scores that are not `same_test_data` differ, in words: their digests (12 digits), or
    their numbers of test images and which split is unknown; `version`: the champion's version number."""
    if challenger.test_data and champion.test_data:
        return f"test split sha256 {challenger.test_data[:12]} vs {champion.test_data[:12]}"
    unknown = unknown_test_split(challenger, champion, version)
    return f"{challenger.test_images} vs {champion.test_images} test images, {unknown} unknown"


def test_split_words(score: Score) -> str:
    """A score's test split in words: its digest (12 digits), else its number of test images, as far as known."""
    if score.test_data:
        return f"test split sha256 {score.test_data[:12]}"
    return f"{score.test_images or 'an unknown number of'} test images, test split unknown"


def unknown_test_split(challenger: Score, champion: Score, version) -> str:
    """Which of a challenger's and a champion's (of version `version`) scores has no test split digest, in words: "v3's
    test split", "this model's test split", "both test splits"; '' where both have one."""
    return {(True, True): "", (True, False): f"v{version}'s test split", (False, True): "this model's test split",
            (False, False): "both test splits"}[bool(challenger.test_data), bool(champion.test_data)]


def settle_alias(name: str, alias: str, test_data: str | None, after: int,
                 unfinished: frozenset[str] = frozenset()) -> str | None:
    """Leave the alias on the best-scoring (the earliest on ties) of the version that holds it and the versions
    registered after version `after`, or by a register running, unfinished, when this one started (`unfinished`,
    `registered_before`; given where this one placed the alias itself): those of registers running alongside this
    one, for this alias (tag `alias`; a
    version without it, registered otherwise, for any), among those scored on the holder's test data (on `test_data`
    if none holds it; `same_test_data` where a digest is missing) and on no image they were trained on; return the
    version that holds it then. A version a register weighed for another alias (`register.alias=staging`) was never
    weighed for this one.

    Registers running at the same time can each read a champion that another is replacing; by re-reading
    the versions they registered after writing, the last register to finish repairs any such race. A register that
    had created its version when this one started may place the alias between this one's check of it and its move:
    so its version is weighed too, not counted among those from before. Versions from before (`after` and older,
    whose registers finished or were stopped) are not weighed again: a champion moved by hand, a roll-back to a worse
    version, stays.
    A holder whose score is unknown here (registered by hand, never evaluated) stays too.
    """
    holder = current_champion(name, alias)
    held = version_score(holder) if holder else None
    if held is not None and held.test_acc is None:
        return str(holder.version)
    pool = held.test_data if held else test_data

    def same_data(version) -> bool:  # a digest missing on either side: their numbers of test images tell, if known
        tag = version.tags.get(TEST_DATA_TAG)
        if not comparable(tag, pool):
            return False
        return holder is None or bool(tag and pool) or same_test_data(version_score(version), held)

    entries = [(tagged_test_acc(v), -int(v.version), v) for v in versions(name)
               if (int(v.version) > after or str(v.version) in unfinished) and tagged_test_acc(v) is not None
               and v.tags.get(ALIAS_TAG, alias) == alias and v.tags.get(IN_TRAIN, "0") == "0" and same_data(v)]
    if holder is not None:
        entries.append((held.test_acc, -int(holder.version), holder))
    if not entries:
        return None
    best = max(entries, key=lambda entry: entry[:2])[2]
    if holder is None or str(holder.version) != str(best.version):
        move_alias(name, alias, best.version)
    return str(best.version)


def log_decision(params: dict, tags: dict[str, str], decision: dict) -> None:
    """Record register's decision on the active run: its params, tags and `decision.json`."""
    log_params(params)  # a -P `mlflow run` logged already kept as it logged it
    mlflow.set_tags(tags)
    mlflow.log_dict(decision, "decision.json")


def report_tags(report: dict) -> dict[str, str]:
    """The version tags of a champion-vs-challenger report; `alias_moved` and the decision (written last: a
    version without it is one whose register was stopped) only once the alias is placed."""
    tags = {}
    if report["champion"]:
        tags.update(champion_version=str(report["champion"]["version"]),
                    test_acc_difference=f"{report['test_acc_difference']:+.6f}"
                    if report["test_acc_difference"] is not None else "")
        if report["champion"].get("evaluate_run"):  # the evaluation the champion's test_acc here came from
            tags[CHAMPION_EVALUATE_RUN_TAG] = report["champion"]["evaluate_run"]
    if report["alias_moved"] is not None:
        tags.update({"alias_moved": str(report["alias_moved"]).lower(), DECISION_TAG: report["reason"]})
    return tags


def record_report(report: dict, markdown: str) -> None:
    """Store the champion-vs-challenger report on the active run (`champion_vs_challenger.json`, `.md`) and with
    the model version (description, tags), the version's decision tag last."""
    # The uploads first: one that fails after the decision tag left a finished version, and the rerun of the
    # failed register registered the model a second time
    mlflow.log_dict(report, "champion_vs_challenger.json")
    mlflow.log_text(markdown, "champion_vs_challenger.md")
    client = MlflowClient()
    name, version = report["model_name"], report["challenger"]["version"]
    client.update_model_version(name, version, description=fit_description(markdown))
    tags = report_tags(report)
    # those of a champion this report has not: a stopped register's rerun may weigh none (it was deleted since) or one
    # scored otherwise, and the version kept the first report's champion beside the rerun's decision
    stale = set(client.get_model_version(name, version).tags) & {"champion_version", "test_acc_difference",
                                                                 CHAMPION_EVALUATE_RUN_TAG} - set(tags)
    for key in sorted(stale):
        client.delete_model_version_tag(name, version, key)
    for key, value in tags.items():  # the decision last: it marks the version finished
        client.set_model_version_tag(name, version, key, value)
