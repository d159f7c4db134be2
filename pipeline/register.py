"""Step 4, register: add an evaluated model to the Model Registry; move the alias if it is better.

Reads:  a logged model URI `models:/m-...` (on its own, `runs:/<train run id>/model` too, and a registry URI
        `models:/<name>@<alias>`, `/<version>`, `/latest`: the logged model of the version it names) that evaluate
        scored (its newest evaluation by an evaluate run that finished, not one that failed, was killed or deleted:
        test_acc, the per-class scores of the same evaluate run, the digest of its test split; `registry.model_score`).
Writes: a new version of `register.model_name` tagged with its source run id, `test_acc`, the evaluate run and
        the test split's digest, how many of its images the model was trained on and the alias it is weighed for;
        the alias `register.alias` (default `champion`) moves to it only if its `test_acc` beats the current
        holder's on the same test data (or no version holds it), measured on no image it was trained on. Where the
        holder was scored on other test data, it is weighed by its model's score on the challenger's
        (`champion_on_test_data`: an evaluation on it that finished, else one register makes with evaluate's code,
        an evaluate run nested in this one); where that cannot be had, the alias stays. A worse model is registered
        but never takes the alias, nor does one whose champion's score is unknown (registered by hand, never evaluated),
        nor one whose test_acc counts training images (evaluate's `test_images_in_train`). A holder whose logged
        model is gone (deleted, or its files: `registry.model_gone`) serves nothing and is not weighed: the alias
        moves; so does one whose training run is in MLflow's trash (`registry.trashed_training_run`), a model its
        user discarded, as register refuses such a challenger. Run tags record the decision.
        A champion-vs-challenger report (both versions' test_acc, per-class accuracy
        differences, the decision and why) becomes the version's description and tags and the
        register run's artifacts `champion_vs_challenger.md/.json`. The version is created with the report
        (the alias still to place) and its tags in one write; a rerun after a register stopped before tagging
        the decision finishes that version (listing it on its logged model too) rather than registering the model
        again, and one whose register finished for the same alias registers nothing (a rerun of a `main` that failed
        after it). The training run gets a description naming its data digest if it has none.
Returns a dict: version, test_acc, previous champion (its version, the test_acc and the evaluate run it was weighed
by), whether the alias moved, and why.
This module decides and writes the report; reading and writing the registry is `pipeline.tracking.registry`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import traceback

import pandas as pd

from pipeline import config, data
from pipeline.inputs import check_configured_backend
from pipeline.tracking import (
    TEST_DATA_TAG,
    StepFailed,
    cli,
    describe_train_run,
    markdown_table,
    model_id,
    open_run,
    registry,
    set_tags,
    step_run,
    steps,
    trials,
    unexpected,
    unexpected_reason,
)
from pipeline.tracking.resume import remove_stale_locks, step_lock

# Tag on an evaluate run register opened to score a champion on a challenger's test data: `<model name>/<version>`
RESCORE_TAG = "scores_champion"
URI_FORMS = "give models:/m-..., models:/<name>@<alias>, models:/<name>/<version> or runs:/<train run id>/model"


def per_class_accuracy(metrics: dict[str, float]) -> dict[str, float]:
    """`test_acc_<class>` metrics -> {class: accuracy}."""
    return {key.removeprefix("test_acc_"): value for key, value in metrics.items() if key.startswith("test_acc_")}


def class_differences(challenger: dict[str, float], champion: dict[str, float]) -> pd.DataFrame:
    """Per-class accuracy of both versions and challenger - champion, largest change first.

    Inputs: {class: accuracy} of each version (the champion's may be empty). Output: columns
    class, champion, challenger, difference (NaN where the champion has no value).
    """
    table = pd.DataFrame({"champion": pd.Series(champion, dtype=float),
                          "challenger": pd.Series(challenger, dtype=float)}).rename_axis("class").reset_index()
    table["difference"] = table["challenger"] - table["champion"]
    return table.sort_values("difference", key=abs, ascending=False, na_position="last", kind="stable")


def fmt(value: float | None, sign: str = "") -> str:
    """4 decimals, empty for a missing value; sign="+" always shows the sign."""
    return "" if value is None else f"{value:{sign}.4f}"


def challenger_report(decision: dict, alias: str, model_uri: str, challenger: registry.Score, champion,
                      held: registry.Score | None, registered: registry.Score | None = None) -> dict:
    """The champion-vs-challenger report: both versions, per-class differences, the decision.

    Inputs: register's decision dict, the alias, the challenger's model URI and the evaluation it was scored by,
    the previous champion's ModelVersion (or None) and the score it is weighed by, and, where that is its model's
    score on the challenger's test data (`champion_on_test_data`), the score it was registered with. Each side's
    per-class accuracies come from the evaluation its test_acc came from; measured on other test splits, they are
    shown without differences. Output: a JSON-ready dict.
    """
    champion_metrics = held.metrics if held else {}
    per_class = class_differences(per_class_accuracy(challenger.metrics), per_class_accuracy(champion_metrics))
    # scores on other test images (another copy, a subset) do not subtract: each side's stays, no difference
    compare = held is None or registry.same_test_data(challenger, held)
    if not compare:
        per_class["difference"] = float("nan")
    difference = (None if decision["champion_test_acc"] is None or not compare
                  else round(decision["test_acc"] - decision["champion_test_acc"], 6))
    return {
        "model_name": decision["model_name"], "alias": alias,
        "challenger": {"version": decision["version"], "model_uri": model_uri, "test_acc": decision["test_acc"]},
        "champion": None if champion is None else {
            "version": decision["champion_version"], "model_uri": registry.version_model_uri(champion),
            "test_acc": decision["champion_test_acc"], "evaluate_run": held.evaluate_run if held else None,
            **({"registered_test_acc": registered.test_acc, "registered_test_data": registered.test_data}
               if registered is not None else {})},
        "test_acc_difference": difference,
        "per_class": per_class.astype(object).where(per_class.notna(), None).to_dict(orient="records"),
        "alias_moved": decision["alias_moved"], "reason": decision["reason"],
    }


def report_markdown(report: dict) -> str:
    """The report as Markdown: the version description and `champion_vs_challenger.md`."""
    name, alias, new, old = report["model_name"], report["alias"], report["challenger"], report["champion"]
    if report["alias_moved"] is None:  # written with the version: the register run places the alias next
        verdict = (f"@{alias} not placed yet ({report['reason']}): if this line stays, the register that created "
                   f"this version was stopped before placing it; rerun register on `{new['model_uri']}` to finish.")
    else:
        verdict = (f"@{alias} {'moved to' if report['alias_moved'] else 'stays off'} v{new['version']}: "
                   f"{report['reason']}.")
    this = "this version" if new["version"] is None else f"v{new['version']}"
    versions = pd.DataFrame([
        ["challenger", this, fmt(new["test_acc"]), f"`{new['model_uri']}`"],
        ["champion", f"v{old['version']}", fmt(old["test_acc"]), f"`{old['model_uri']}`"] if old
        else ["champion", "none", "", f"no version held @{alias}"],
    ], columns=["", "version", "test_acc", "model"])
    text = f"**Champion vs challenger** ({name}): {verdict}\n\n{markdown_table(versions)}"
    if old and "registered_test_acc" in old:
        text += (f"\nv{old['version']}'s test_acc is its model's score on the challenger's test data (evaluate run "
                 f"`{old['evaluate_run']}`); it was registered with {fmt(old['registered_test_acc'])}, measured on "
                 f"other test data (test split sha256 `{(old['registered_test_data'] or '')[:12]}`).\n")
    if report["per_class"]:
        per_class = pd.DataFrame([[row["class"], fmt(row["champion"]), fmt(row["challenger"]),
                                   fmt(row["difference"], "+")] for row in report["per_class"]],
                                 columns=["class", "champion", "challenger", "difference"])
        text += f"\nPer-class test accuracy (largest change first):\n\n{markdown_table(per_class)}"
    return text


def _version(model_version) -> str | None:
    return None if model_version is None else str(model_version.version)


def champion_on_test_data(cfg: config.Config, name: str, champion, challenger: registry.Score
                          ) -> tuple[registry.Score | None, str]:
    """The score of `champion` (a ModelVersion registered with a score on other test data than `challenger`'s)
    on the challenger's test data, and how it was had; (None, why not) where it cannot be had.

    Its logged model's newest evaluation of that test split whose evaluate run finished (`registry.model_score`:
    one an earlier register made, or one the user ran) is the score; without one, evaluate's own `run` scores the
    model on the dataset the challenger's evaluate run read (its param `dataset_uri`), as the model is served
    (its test-time augmentation, as at its own evaluation), in an evaluate run nested in the register run, tagged
    `scores_champion` (`<name>/<version>`): it records the score on the model as any evaluation does, so later
    registers on that test data find it and score nothing again. Not had, with the reason: the champion's model
    is not a logged model or cannot be loaded, the challenger's evaluate run names no dataset, the dataset cannot
    be read or holds other test images now (a file changed since), or its classes are not the model's, or scoring
    it failed unexpectedly (out of memory, an error of TensorFlow or JAX: its traceback printed, its evaluate run
    ended FAILED saying why), which would otherwise fail every register until the champion is moved by hand.
    """
    uri = registry.version_model_uri(champion)
    if not challenger.test_data:  # an evaluation of any test split would do below
        return None, "this model's test split is unknown (its score has no test_data_sha256 to score the other on)"
    found = registry.model_score(uri, test_data=challenger.test_data)
    if found.test_acc is not None:
        return found, f"its model's evaluation on it by evaluate run {found.evaluate_run}"
    if model_id(uri) is None:
        return None, f"its model {uri} is not a logged model models:/m-... that evaluate records a score on"
    dataset_uri = challenger.dataset_uri
    if not dataset_uri:
        return None, f"evaluate run {challenger.evaluate_run} names no dataset_uri to read that test data from"
    from pipeline import evaluate, prepare  # Keras loads only where a champion is scored

    try:
        dataset = prepare.load_dataset(dataset_uri)
        digest = dataset.digest(test_only=True)
        if digest != challenger.test_data:
            return None, (f"{dataset_uri} holds other test images now (test split sha256 {digest[:12]}, not "
                          f"{challenger.test_data[:12]})")
        classifier = steps.load_classifier(uri)
        evaluate.check_classes(classifier, dataset, uri)
        print(f"v{champion.version} holds @{cfg.register.alias} with a score on other test data: scoring its model "
              f"{uri} on the challenger's test data ({dataset_uri}) to compare on equal data")
        tta = getattr(classifier, "tta", "none")  # what evaluate scores it with anyway: no note that it differs
        as_served = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, tta=tta))
        suffix = f"-v{champion.version}"  # MLflow's column for a run's name holds 250 (PostgreSQL enforces it)
        with open_run("evaluate", experiment=cfg.tracking.experiment,
                      run_name=f"evaluate-{name}"[:250 - len(suffix)] + suffix,
                      tags={RESCORE_TAG: f"{name}/{champion.version}"}) as scoring:
            set_tags({"mlflow.note.content": f"v{champion.version} of `{name}` (`{uri}`) scored on the test data "
                                             f"of a challenger (`{dataset_uri}`) by the register run that "
                                             f"weighed them, to compare their test_acc on the same images."})
            evaluate.run(as_served, uri, dataset_uri, dataset=dataset, classifier=classifier)
    except (config.ConfigError, data.DataError, StepFailed) as exc:
        return None, str(exc)
    except Exception as exc:  # out of memory, an error of TensorFlow or JAX: the register goes on, the alias stays
        if not unexpected(exc):  # the tracking server failed: so does the register (exit 4), rerun it
            raise
        traceback.print_exc()  # where the reason says the traceback is; the scoring run, if opened, ended FAILED
        return None, unexpected_reason(exc)
    made = registry.model_score(uri, evaluate_run=scoring.info.run_id, test_data=challenger.test_data)
    if made.evaluate_run != scoring.info.run_id:  # it recorded no score on the model: none a later register finds
        return None, f"evaluate run {scoring.info.run_id} recorded no score on {uri}"
    return made, f"scored on it by evaluate run {scoring.info.run_id}"


def registered_already(name: str, alias: str, model_uri: str, version, *, alongside: bool = False,
                       given_uri: str | None = None) -> dict:
    """register's decision where a register finished `version` of `model_uri` with the same score, or (`alongside`)
    one running at the same time created it first: nothing is written to the registry again (the version keeps its
    report, or gets that register's), the register run records why, naming the champion the version was weighed
    against as its report does (`registry.weighed_champion`)."""
    holder = _version(registry.current_champion(name, alias))
    champion, held, _ = registry.weighed_champion(name, version)
    moved = holder == str(version.version)
    by = " (registered alongside, by a register of it running at the same time, which places the alias)" * alongside
    reason = (f"v{version.version} registers {model_uri} with this test_acc on the same test data already{by}: not "
              f"registered again; @{alias} is {'on it' if moved else f'on v{holder}' if holder else 'on no version'}")
    decision = {"model_name": name, "version": int(version.version), "test_acc": float(version.tags["test_acc"]),
                "champion_version": int(champion.version) if champion else None,
                "champion_test_acc": held.test_acc if held else None,
                "champion_evaluate_run": held.evaluate_run if held else None, "alias_moved": moved, "reason": reason}
    registry.log_decision({"model_uri": given_uri or model_uri, "register.model_name": name, "register.alias": alias},
                          {"registered_version": str(version.version), "registered_model_uri": model_uri,
                           "alias_moved": str(moved).lower(), "decision": reason}, decision)
    print(f"{name}: {reason}")
    return decision


def run(cfg: config.Config, model_uri: str, given_uri: str | None = None) -> dict:
    """Register inside the active run; report champion vs challenger; return the decision. `given_uri`: the URI the
    command was given where `model_uri` is the logged model behind it (param `model_uri`, as `mlflow run` logs it)."""
    name, alias = cfg.register.model_name, cfg.register.alias
    score = registry.model_test_acc(model_uri)  # checked before anything is written
    # versions above `after`, and those whose registers have not finished, are those of registers alongside this one
    after, unfinished = registry.registered_before(name, alias)
    champion = registry.current_champion(name, alias)
    held = registry.version_score(champion) if champion else None
    champion_acc = held.test_acc if held else None
    diverged = champion_acc is not None and math.isnan(champion_acc)  # its model's score: a diverged model's
    champion_acc = None if diverged else champion_acc  # no score to weigh or rescore

    tagged = f"{score.test_acc:.6f}"  # compared as tagged: the champion's score is its tag (an equal score is a tie)
    test_acc, test_data = float(tagged), score.test_data
    tags = {"test_acc": tagged, "run_id": score.source_run or "", registry.EVALUATE_RUN_TAG: score.evaluate_run or "",
            registry.ALIAS_TAG: alias,
            **({TEST_DATA_TAG: test_data} if test_data else {}),
            **({registry.IN_TRAIN: str(score.in_train)} if score.in_train is not None else {})}
    # a register of this model stopped (killed, Ctrl-C) before its report: finished now, not registered twice
    version = registry.same_score_version(name, model_uri, tags, finished=False)
    done = None if version else registry.same_score_version(name, model_uri, tags, finished=True)
    if done is not None:  # registered with this score already: a rerun of a main that failed after its register
        return registered_already(name, alias, model_uri, done, given_uri=given_uri)
    if version is not None and model_id(model_uri):  # stopped before listing it on its model, perhaps: listed now
        registry.list_versions_on_model(model_id(model_uri))
    resumed = version is not None and _version(champion) == _version(version)
    registered, how = None, ""  # the champion's registered score, where it is weighed by another, and how had
    if resumed:  # the champion it was weighed against, as its report has it: not itself, which holds the alias now
        champion, held, registered = registry.weighed_champion(name, version)
        champion_acc = held.test_acc if held else None
    # a champion whose model was deleted, or its files, serves nothing: its registered score weighs nothing either
    gone = None if champion is None or resumed else registry.model_gone(registry.version_model_uri(champion))
    # so is one whose training run is in the trash, a model its user discarded (register refuses such a challenger)
    trashed = None if champion is None or resumed or gone else registry.trashed_training_run(
        registry.version_model_uri(champion))
    if (champion is not None and champion_acc is not None and not score.in_train and not resumed and not gone
            and not trashed and not registry.same_test_data(score, held)):  # other test data: on the challenger's
        rescored, how = champion_on_test_data(cfg, name, champion, score)
        if rescored is not None:
            registered, held, champion_acc = held, rescored, float(f"{rescored.test_acc:.6f}")
    on_equal_data = "" if registered is None else (
        f" on this test data ({how}; v{champion.version} was registered with {registered.test_acc:.4f} on other "
        f"test data, {registry.test_split_words(registered)})")
    # weighed on test data taken as the same for want of a digest (scored before evaluate recorded one, or by hand)
    if registered is None and held is not None and (unknown := registry.unknown_test_split(score, held,
                                                                                          champion.version)):
        on_equal_data = f" ({unknown} {'are' if unknown.startswith('both') else 'is'} unknown: compared as if the same)"
    if resumed:
        moved, reason = True, (f"v{version.version} holds @{alias} already: a register of this model placed it "
                               f"there and was stopped before its report")
    elif score.in_train:  # a score on images it learned is no measure of unseen ones, however it compares
        moved, reason = False, (f"test_acc {test_acc:.4f} counts {score.in_train} test images the model was "
                                f"trained on (the same pixels in its training split): not a score on unseen images, "
                                f"@{alias} not moved to it; take them out of the training or test split, prepare and "
                                f"evaluate again, or move @{alias} to it by hand")
    elif champion is None:
        moved, reason = True, f"no version held @{alias}"
    elif gone:
        was = "" if champion_acc is None else f" (v{champion.version} was registered with {champion_acc:.4f})"
        moved, reason = True, (f"v{champion.version} holds @{alias}, but its model "
                               f"{registry.version_model_uri(champion)} is gone ({gone}): nothing to serve or weigh "
                               f"test_acc {test_acc:.4f} against{was}; @{alias} moved")
    elif trashed:
        was = "" if champion_acc is None else f" (v{champion.version} was registered with {champion_acc:.4f})"
        moved, reason = True, (f"v{champion.version} holds @{alias}, but its model "
                               f"{registry.version_model_uri(champion)} was logged by run {trashed}, which is in "
                               f"MLflow's trash (mlflow runs restore --run-id {trashed} restores it): not weighed "
                               f"against test_acc {test_acc:.4f}{was}; @{alias} moved")
    elif diverged:  # a NaN no challenger could beat kept the alias for good
        moved, reason = True, (f"v{champion.version} holds @{alias} with test_acc NaN, a diverged model's score: no "
                               f"score to weigh test_acc {test_acc:.4f} against; @{alias} moved")
    elif champion_acc is None:
        moved, reason = False, (f"v{champion.version} holds @{alias} without a test_acc (registered by hand, and "
                                f"evaluate has not scored its model): @{alias} kept; evaluate it, or move @{alias} "
                                f"by hand")
    elif not registry.same_test_data(score, held):
        moved, reason = False, (f"test_acc {test_acc:.4f} was measured on other test data than v{champion.version}'s "
                                f"{champion_acc:.4f} ({registry.test_data_difference(score, held, champion.version)}), "
                                f"and v{champion.version}'s model could not be scored on this one ({how}): "
                                f"not comparable, @{alias} kept; register it under another register.model_name, or "
                                f"move @{alias} to it by hand")
    elif registered is not None and held.in_train:  # the champion's score on these images is none on unseen ones
        moved, reason = False, (f"v{champion.version}'s model scored {champion_acc:.4f}{on_equal_data}, counting "
                                f"{held.in_train} test images it was trained on (the same pixels in its training "
                                f"split): not a score on unseen images to weigh test_acc {test_acc:.4f} against, "
                                f"@{alias} kept; move @{alias} to it by hand")
    elif test_acc > champion_acc:
        moved, reason = True, f"test_acc {test_acc:.4f} beats v{champion.version}'s {champion_acc:.4f}{on_equal_data}"
    else:
        moved, reason = False, (f"test_acc {test_acc:.4f} does not beat v{champion.version}'s "
                                f"{champion_acc:.4f}{on_equal_data}")
    decision = {"model_name": name, "version": None, "test_acc": test_acc,
                "champion_version": int(champion.version) if champion else None, "champion_test_acc": champion_acc,
                "champion_evaluate_run": held.evaluate_run if held else None, "alias_moved": None, "reason": reason}
    if version is None:  # created with its report, the alias still to place: no kill leaves a bare version
        pending = challenger_report(decision, alias, model_uri, score, champion, held, registered)
        version, created = registry.register_version(model_uri, name, {**tags, **registry.report_tags(pending)},
                                                     description=report_markdown(pending))
        if not created:  # a register of this model alongside created its version first: it places the alias
            return registered_already(name, alias, model_uri, version, alongside=True, given_uri=given_uri)
    placed = moved and _version(registry.current_champion(name, alias)) == _version(champion)
    if placed:
        registry.move_alias(name, alias, version.version)
    # else a register alongside moved the alias since it was read: settle weighs this version against the new holder;
    # placed, it may have replaced a version a register unfinished when this one started placed after the check
    holder = registry.settle_alias(name, alias, test_data, after, unfinished if placed else frozenset())
    if moved != (holder == str(version.version)):  # a register running at the same time scored better or worse
        moved = holder == str(version.version)
        reason += f"; @{alias} is on v{holder}, the best-scoring version, after registers that ran alongside"
    decision.update(version=int(version.version), alias_moved=moved, reason=reason)
    registry.log_decision({"model_uri": given_uri or model_uri, "register.model_name": name, "register.alias": alias},
                          {"registered_version": str(version.version), "registered_model_uri": model_uri,
                           "alias_moved": str(moved).lower(), "decision": reason}, decision)
    if score.source_run:  # before the report, whose decision tag marks the version finished: nothing may fail after
        describe_train_run(score.source_run)  # a no-op where the training run already has one
    report = challenger_report(decision, alias, model_uri, score, champion, held, registered)
    registry.record_report(report, report_markdown(report))
    print(f"registered {name} v{version.version}: {'@' + alias + ' moved' if moved else 'alias kept'} ({reason})")
    return decision


def main() -> None:
    args = config.entry_point_parser("register", __doc__.split("\n")[0]).parse_args()
    cfg = config.load_from_cli(args.params, args.overrides)
    config.note_unread("register", args.overrides)
    # Keras scores a champion on a challenger's test data: a backend it cannot load printed its traceback in the run
    check_configured_backend()
    model_uri = args.model_uri
    if not model_uri.strip():  # evaluate's line
        raise config.ConfigError(f"model_uri: empty; {URI_FORMS}")
    if why := steps.bare_id(model_uri):  # evaluate's line
        raise config.ConfigError(f"model_uri: {why}")
    registry.check_names_version(model_uri)  # models:/<name>(/): evaluate's line, naming the URI as given
    # a models:/ URI's trailing slash (a shell's completion, a copied path), which evaluate reads as without it
    # (steps.logged_model_id), was refused here ("expected a logged model URI")
    if model_uri.rstrip("/").startswith("models:/"):
        model_uri = model_uri.rstrip("/")
    # `runs:/<train run id>/model`, as evaluate takes it: the logged model behind it (MLflow 3 logs a run's model so)
    if model_uri.startswith("runs:/"):
        if not (found := steps.logged_model_id(model_uri)):  # not "expected a logged model URI", a form it takes
            raise config.ConfigError(f"model_uri: {model_uri} names no logged model: {steps.why_no_model(model_uri)}")
        model_uri = f"models:/{found}"
        print(f"model_uri: {args.model_uri} is {model_uri}")
    # a registry URI (`models:/name@alias`, `/3`, `/latest`): its version's logged model, read once (an alias moves)
    elif (version := registry.registry_version(model_uri)) is not None:
        model_uri = registry.version_model_uri(version)
        if model_id(model_uri) is None:
            raise config.ConfigError(f"model_uri: {args.model_uri} is v{version.version} of {version.name}, whose "
                                     f"source {model_uri} is no logged model models:/m-... that evaluate scores")
        # its model weighed against itself as a version of its own; for another alias, as its models:/m-... is
        if (version.name == cfg.register.model_name
                and (version.tags or {}).get(registry.ALIAS_TAG, cfg.register.alias) == cfg.register.alias):
            why = (f"{args.model_uri} is v{version.version} of {version.name}, register.model_name, for "
                   f"@{cfg.register.alias} already: nothing to register (name another register.model_name or "
                   f"register.alias to register it for that)")
            if wrapper := os.environ.get("MLFLOW_RUN_ID"):  # the run `mlflow run` opened says why it holds nothing
                trials.set_run_tags(wrapper, {"step": "register", "decision": why})
            print(f"model_uri: {why}")
            return
        print(f"model_uri: {args.model_uri} is v{version.version} of {version.name}, {model_uri}")
    elif not model_uri.startswith("models:/"):  # a path, which evaluate scores, but whose scores land on its run only
        copied = steps.copied_model_id(model_uri)
        raise config.ConfigError(f"model_uri: {model_uri} is a folder, no model register takes: it holds a copy of "
                                 f"models:/{copied}: give that" if copied else
                                 f"model_uri: {model_uri!r} is no model register takes; {URI_FORMS}")
    registry.model_test_acc(model_uri)  # a wrong URI or an unevaluated model fails before a run is opened
    steps.check_run_not_trashed(model_uri, model_id(model_uri), "register its model")  # as evaluate refuses it
    with step_lock() as hold, step_run(cfg, "register") as step:
        hold(step)  # killed, it is left for the next main to end
        # a register killed before (SIGKILL) left its run RUNNING: ended now, as a main ends it, its version is no
        # longer taken for one of a register running alongside, and weighed (`registry.registered_before`)
        remove_stale_locks()
        run(cfg, model_uri, args.model_uri)


if __name__ == "__main__":
    cli(main)
