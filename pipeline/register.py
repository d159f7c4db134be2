"""Step 4, register: add an evaluated model to the Model Registry; move the alias if it is better.

Reads:  a logged model URI whose `test_acc` was recorded by evaluate.
Writes: a new version of `register.model_name` tagged with its source run id and `test_acc`;
        the alias `register.alias` (default `champion`) moves to it only if its `test_acc`
        beats the current holder's (or no version holds it). A worse model is registered
        but never takes the alias. Run metrics/tags record the decision.
Returns a dict: version, test_acc, previous champion, whether the alias moved, and why.
"""

from __future__ import annotations

import argparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import config
from pipeline.evaluate import model_id_of
from pipeline.tracking import cli, step_run


def model_test_acc(model_uri: str) -> tuple[float, str | None]:
    """`test_acc` recorded on a logged model by evaluate, and the run that trained it."""
    model_id = model_id_of(model_uri)
    if model_id is None:
        raise config.ConfigError(f"model_uri: expected a logged model URI models:/m-..., got {model_uri!r}")
    try:
        model = mlflow.get_logged_model(model_id)
    except MlflowException as exc:
        raise config.ConfigError(f"model_uri: no logged model {model_id} ({exc.message})") from None
    accs = [m.value for m in model.metrics or [] if m.key == "test_acc"]
    if not accs:
        raise config.ConfigError(f"model_uri: {model_uri} has no test_acc yet: run evaluate on it first")
    return float(accs[-1]), model.source_run_id


def current_champion(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None  # no registered model of that name yet, or no version holds the alias


def run(cfg: config.Config, model_uri: str) -> dict:
    """Register inside the active run; return the decision."""
    name, alias = cfg.register.model_name, cfg.register.alias
    test_acc, source_run = model_test_acc(model_uri)  # checked before anything is written
    client = MlflowClient()
    champion = current_champion(client, name, alias)
    champion_acc = float(champion.tags["test_acc"]) if champion and "test_acc" in champion.tags else None

    version = mlflow.register_model(model_uri, name, tags={"test_acc": f"{test_acc:.6f}",
                                                           "run_id": source_run or ""})
    if champion is None or champion_acc is None:
        moved, reason = True, f"no version held @{alias}"
    elif test_acc > champion_acc:
        moved, reason = True, f"test_acc {test_acc:.4f} beats v{champion.version}'s {champion_acc:.4f}"
    else:
        moved, reason = False, f"test_acc {test_acc:.4f} does not beat v{champion.version}'s {champion_acc:.4f}"
    if moved:
        client.set_registered_model_alias(name, alias, version.version)
    client.update_model_version(name, version.version, description=f"@{alias} {'moved here' if moved else 'kept'}: "
                                                                    f"{reason}.")
    decision = {"model_name": name, "version": int(version.version), "test_acc": test_acc,
                "champion_version": int(champion.version) if champion else None, "champion_test_acc": champion_acc,
                "alias_moved": moved, "reason": reason}
    mlflow.log_params({"model_uri": model_uri, "register.model_name": name, "register.alias": alias})
    mlflow.set_tags({"registered_version": str(version.version), "alias_moved": str(moved).lower(),
                     "decision": reason})
    mlflow.log_dict(decision, "decision.json")
    print(f"registered {name} v{version.version}: {'@' + alias + ' moved' if moved else 'alias kept'} ({reason})")
    return decision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="")
    parser.add_argument("--overrides", default="")
    parser.add_argument("--model-uri", required=True)
    args = parser.parse_args()
    cfg = config.load_from_cli(args.params, args.overrides)
    model_test_acc(args.model_uri)  # a wrong URI or an unevaluated model fails before a run is opened
    with step_run(cfg, "register"):
        run(cfg, args.model_uri)


if __name__ == "__main__":
    cli(main)
