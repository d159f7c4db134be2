"""The Model Registry side of the tracking layer: what `register` reads and writes.

`model_test_acc` reads the test_acc evaluate logged on a model (the latest value, `latest_metrics`);
`current_champion` finds the version holding an alias; `register_version` adds a version;
`move_alias` and `settle_alias` place the alias; `log_decision` and `record_report` store
the decision and the champion-vs-challenger report on the register run and the version.
Versions are MLflow `ModelVersion` entities: register reads their `version`, `tags`, `model_id`
and `source` only.
"""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils import logging_utils

from pipeline import config
from pipeline.tracking import TEST_DATA_TAG, latest_metrics, model_id


def model_test_acc(model_uri: str) -> tuple[float, str | None, str | None]:
    """`test_acc` recorded on a logged model by evaluate, the run that trained it, and the digest of the test
    split it was measured on (None for a model evaluated before evaluate recorded it)."""
    logged_model = model_id(model_uri)
    if logged_model is None:
        raise config.ConfigError(f"model_uri: expected a logged model URI models:/m-..., got {model_uri!r}")
    try:
        model = mlflow.get_logged_model(logged_model)
    except MlflowException as exc:
        raise config.ConfigError(f"model_uri: no logged model {logged_model} ({exc.message})") from None
    test_acc = latest_metrics(model.metrics).get("test_acc")
    if test_acc is None:
        raise config.ConfigError(f"model_uri: {model_uri} has no test_acc yet: run evaluate on it first")
    return float(test_acc), model.source_run_id, (model.tags or {}).get(TEST_DATA_TAG)


def current_champion(name: str, alias: str):
    """The version of registered model `name` that holds `alias`, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None  # no registered model of that name yet, or no version holds the alias


def register_version(model_uri: str, name: str, tags: dict[str, str]):
    """Register `model_uri` as a new version of `name` (created if new), tagged `tags`; the ModelVersion.

    MLflow's own "Successfully registered model / Created version" echo is muted: the register step
    prints one line saying what it registered and why. Failures still raise.
    """
    logging_utils.disable_logging()
    try:
        return mlflow.register_model(model_uri, name, tags=tags)
    finally:
        logging_utils.enable_logging()


def move_alias(name: str, alias: str, version: str | int) -> None:
    """Point `alias` of registered model `name` at `version`."""
    MlflowClient().set_registered_model_alias(name, alias, version)


def comparable(a: str | None, b: str | None) -> bool:
    """Whether scores measured on test splits of digests `a` and `b` compare (an unknown one, from a model
    evaluated before the digest was recorded, compares with any)."""
    return a is None or b is None or a == b


def settle_alias(name: str, alias: str, test_data: str | None) -> str | None:
    """Leave the alias on the best-scoring version (the earliest on ties) among those scored on the test data of
    the version that holds it (of `test_data` if none holds it); return the version that holds it then.

    Registers running at the same time can each read a champion that another is replacing; by
    re-reading every version after writing, the last register to finish repairs any such race.
    """
    holder = current_champion(name, alias)
    pool = holder.tags.get(TEST_DATA_TAG) if holder else test_data
    scored = [v for v in MlflowClient().search_model_versions(f"name = '{name}'")
              if "test_acc" in v.tags and comparable(v.tags.get(TEST_DATA_TAG), pool)]
    if not scored:
        return str(holder.version) if holder else None
    best = max(scored, key=lambda v: (float(v.tags["test_acc"]), -int(v.version)))
    if holder is None or str(holder.version) != str(best.version):
        move_alias(name, alias, best.version)
    return str(best.version)


def log_decision(params: dict, tags: dict[str, str], decision: dict) -> None:
    """Record register's decision on the active run: its params, tags and `decision.json`."""
    mlflow.log_params(params)
    mlflow.set_tags(tags)
    mlflow.log_dict(decision, "decision.json")


def record_report(report: dict, markdown: str) -> None:
    """Store the champion-vs-challenger report with the model version (description, tags) and on the
    active run (`champion_vs_challenger.json`, `.md`)."""
    client = MlflowClient()
    name, version = report["model_name"], report["challenger"]["version"]
    client.update_model_version(name, version, description=markdown)
    tags = {"alias_moved": str(report["alias_moved"]).lower(), "decision": report["reason"]}
    if report["champion"]:
        tags.update(champion_version=str(report["champion"]["version"]),
                    test_acc_difference=f"{report['test_acc_difference']:+.6f}"
                    if report["test_acc_difference"] is not None else "")
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    mlflow.log_dict(report, "champion_vs_challenger.json")
    mlflow.log_text(markdown, "champion_vs_challenger.md")
