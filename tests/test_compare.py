"""End to end against a real `mlflow server`: what the UI shows after two trainings, compare, sweep.

One server per module (SQLite backend, proxied artifacts under tmp), on a free loopback port.
Runs go through `mlflow run` with MLFLOW_TRACKING_URI pointing at it; every check reads the
server's REST API, the same calls the MLflow UI makes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request

import mlflow
import pytest

from bench.servers import free_port, server_run_command, start_tracking_server, stop_group
from tests.conftest import ROOT

TINY = "params/tiny.yaml"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """URL of a fresh `mlflow server` (killed, with its workers, at the end of the module)."""
    port = free_port()
    process = start_tracking_server(tmp_path_factory.mktemp("server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(process)


def api(url: str, path: str, body: dict | None = None, **query: str) -> dict:
    """GET (or POST `body` to) the server's REST API; the decoded JSON answer."""
    full = f"{url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read() or b"{}")


def artifact_bytes(url: str, run_id: str, path: str) -> bytes:
    with urllib.request.urlopen(f"{url}/get-artifact?{urllib.parse.urlencode({'path': path, 'run_uuid': run_id})}",
                                timeout=30) as answer:
        return answer.read()


def search(url: str, experiment_id: str, where: str) -> list[dict]:
    return api(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id], "filter": where,
                                                    "max_results": 100}).get("runs", [])


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params_of(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def create_experiment(url: str, name: str) -> str:
    return api(url, "/api/2.0/mlflow/experiments/create", {"name": name})["experiment_id"]


def mlflow_run(url: str, experiment_name: str, entry: str, **params: str) -> subprocess.CompletedProcess:
    """`mlflow run <project> -e ENTRY --env-manager local --experiment-name EXPERIMENT -P k=v ...` against `url`."""
    cmd, env = server_run_command(url, experiment_name, entry, params)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_two_trainings_show_in_the_ui_and_compare(server, in_process):
    experiment_id = create_experiment(server, "e2e")
    # One training as a person starts it, `mlflow run` against the server; the other as `python -m pipeline.main` in
    # this process, which makes the same calls to the server (Keras loads here, not in three more processes). Both
    # name the experiment in their params, so the params differ in train.lr alone, as before. One stage of basic blocks
    # (resnet4): fewer layers to trace, the model not being what the test is about.
    overrides = "tracking.experiment=e2e model.block=basic model.widths=[16] model.strides=[1] train.lr="
    done = mlflow_run(server, "e2e", "main", params=TINY, epochs="2", overrides=f"{overrides}0.02")
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow.set_tracking_uri(server)
    try:
        done = in_process("main", "--params", TINY, "--epochs", "2", "--overrides", f"{overrides}0.1",
                          env={"MLFLOW_TRACKING_URI": server})
    finally:
        mlflow.set_tracking_uri(None)
    assert done.returncode == 0, done.stderr[-3000:]

    # The runs list: both training runs, named after what they train, with a description naming the data.
    trains = search(server, experiment_id, "tags.step = 'train'")
    assert sorted(tags_of(r)["mlflow.runName"] for r in trains) == [
        "resnet4-e2-b32-lr0.02", "resnet4-e2-b32-lr0.1"]
    digest = tags_of(search(server, experiment_id, "tags.step = 'prepare'")[0])["dataset_sha256"]
    for run in trains:
        assert digest in tags_of(run)["mlflow.note.content"]
        # The run page's charts: one val_acc point per epoch.
        history = api(server, "/api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"],
                      metric_key="val_acc")["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]
        assert all(0 <= m["value"] <= 1 for m in history)

    # The registry: @champion on the better version; version 2 carries the champion-vs-challenger report.
    champion = api(server, "/api/2.0/mlflow/registered-models/alias", name="cifar10-resnet",
                   alias="champion")["model_version"]
    v1, v2 = (api(server, "/api/2.0/mlflow/model-versions/get", name="cifar10-resnet", version=v)["model_version"]
              for v in ("1", "2"))
    accs = {v["version"]: float({t["key"]: t["value"] for t in v["tags"]}["test_acc"]) for v in (v1, v2)}
    assert champion["version"] == ("2" if accs["2"] > accs["1"] else "1")
    v2_tags = {t["key"]: t["value"] for t in v2["tags"]}
    assert v2_tags["champion_version"] == "1" and v2_tags["alias_moved"] == str(accs["2"] > accs["1"]).lower()
    assert "Champion vs challenger" in v2["description"] and "| class_0 |" in v2["description"]
    register_run = next(r for r in search(server, experiment_id, "tags.step = 'register'")
                        if tags_of(r)["registered_version"] == "2")
    report = json.loads(artifact_bytes(server, register_run["info"]["run_id"], "champion_vs_challenger.json"))
    assert report["champion"]["version"] == 1 and report["challenger"]["version"] == 2
    assert len(report["per_class"]) == 10
    assert all(row["difference"] == pytest.approx(row["challenger"] - row["champion"]) for row in report["per_class"])
    assert report["test_acc_difference"] == pytest.approx(accs["2"] - accs["1"], abs=1e-5)

    # compare: a comparison run holding the table (only lr differs) and the val_acc plot.
    done = mlflow_run(server, "e2e", "compare", experiment="e2e")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\| run +\| run_id +\| train\.lr +\|", done.stdout), done.stdout
    comparison = search(server, experiment_id, "tags.step = 'compare'")
    assert len(comparison) == 1 and comparison[0]["info"]["status"] == "FINISHED"
    compare_id = comparison[0]["info"]["run_id"]
    files = {f["path"] for f in api(server, "/api/2.0/mlflow/artifacts/list", run_id=compare_id).get("files", [])}
    assert files == {"runs.md", "runs.csv", "val_acc.png", "compared_runs.txt"}
    rows = list(csv.DictReader(io.StringIO(artifact_bytes(server, compare_id, "runs.csv").decode())))
    assert sorted(r["train.lr"] for r in rows) == ["0.02", "0.1"]
    assert all(r["epochs"] == "2" and float(r["test_acc"]) == pytest.approx(accs[str(i)], abs=1e-5)
               for i, r in ((1 if r["train.lr"] == "0.02" else 2, r) for r in rows))
    assert not {"train.epochs", "model.block", "dataset_uri"} & set(rows[0])  # only what differs
    assert artifact_bytes(server, compare_id, "val_acc.png").startswith(b"\x89PNG")
    assert set(tags_of(comparison[0])["compared_runs"].split(",")) == {r["info"]["run_id"] for r in trains}

    # Top 1 by test_acc, and a bad experiment name: one error line, exit status 2, no run. `python -m
    # pipeline.compare` in this process (its process is what `mlflow run . -e compare` above ran).
    mlflow.set_tracking_uri(server)
    try:
        top = in_process("compare", "--experiment", "e2e", "--top", "1", "--metric", "test_acc")
        bad = in_process("compare", "--experiment", "no-such")
    finally:
        mlflow.set_tracking_uri(None)
    assert top.returncode == 0, top.stderr[-2000:]
    assert f"{max(accs.values()):.4f}" in top.stdout and top.stdout.count("| resnet4-") == 1
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: experiment: no experiment named " \
                                                                          "'no-such'"


def test_sweep_marks_a_failed_trial_goes_on_and_registers_the_best(server, tmp_path):
    experiment_id = create_experiment(server, "e2e-sweep")
    spec = tmp_path / "sweep-fails.yaml"
    # an lr of 1e12 passes validation, and the trial diverges (NaN loss) at run time: it fails, the sweep goes on
    spec.write_text(f"base: {TINY}\noverrides: {{train.epochs: 1, register.model_name: sweep-model, "
                    f"train.validation_fraction: 0.1}}\n"
                    "grid:\n  train.lr: [1.0e+12, 0.05]\n")
    done = mlflow_run(server, "e2e-sweep", "sweep", spec=str(spec), storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert done.returncode == 0, done.stderr[-3000:]

    sweep = search(server, experiment_id, "tags.step = 'sweep'")
    assert len(sweep) == 1 and sweep[0]["info"]["status"] == "FINISHED"
    sweep_id = sweep[0]["info"]["run_id"]
    trials = {params_of(r)["train.lr"]: r
              for r in search(server, experiment_id, f"tags.step = 'trial' and tags.mlflow.parentRunId = '{sweep_id}'")}
    assert set(trials) == {"1000000000000.0", "0.05"}
    failed, good = trials["1000000000000.0"], trials["0.05"]
    assert failed["info"]["status"] == "FAILED" and "diverged" in tags_of(failed)["failure_reason"]
    assert good["info"]["status"] == "FINISHED"  # the sweep went on after the first trial failed
    assert {m["key"] for m in good["data"]["metrics"]} >= {"test_acc", "val_acc", "best_val_acc"}

    champion = api(server, "/api/2.0/mlflow/registered-models/alias", name="sweep-model",
                   alias="champion")["model_version"]
    assert {t["key"]: t["value"] for t in champion["tags"]}["run_id"] == tags_of(good)["train_run_id"]
    assert tags_of(sweep[0])["best_trial_run_id"] == good["info"]["run_id"]
    children = search(server, experiment_id, f"tags.mlflow.parentRunId = '{sweep_id}'")
    assert {tags_of(r)["step"] for r in children} >= {"trial", "register", "compare"}


def test_a_runs_description_names_its_architecture():
    from pipeline import config
    from pipeline.tracking import model_summary

    for params_file, expected in (("params/default.yaml", "Pre-activation ResNet-164 (bottleneck blocks"),
                                  ("params/quick.yaml", "ResNet-9 (conv-BN-ReLU, widths [16, 48, 192, 384], "
                                                        "patch-whitening stem)"),
                                  ("params/fast.yaml", "ResNet-9 (conv-BN-ReLU, widths [64, 128, 256, 512], "
                                                       "patch-whitening stem)")):
        cfg = config.load(ROOT / params_file)
        summary = model_summary({k: str(v) for k, v in cfg.flat().items()}, {"model_depth": str(cfg.model.depth)})
        assert summary.startswith(expected), (params_file, summary)


def test_top_runs_puts_the_best_first_lowest_for_times_losses_and_images_trained_on():
    import pandas as pd

    from pipeline.compare import top_runs

    table = pd.DataFrame({"run_id": ["slow", "fast", "unfinished"], "test_acc": [0.9, 0.8, float("nan")],
                          "wall_s": [300.0, 100.0, float("nan")], "val_loss": [0.4, 0.6, 0.5],
                          "val_images_in_train": [12.0, 0.0, float("nan")],
                          "test_images_in_train": [0.0, 64.0, float("nan")]})
    # a score counting images the model trained on is the less to be trusted the more it counts: fewest first
    assert top_runs(table, "val_images_in_train", 1)["run_id"].tolist() == ["fast"]
    assert top_runs(table, "test_images_in_train", None)["run_id"].tolist() == ["slow", "fast", "unfinished"]
    assert top_runs(table, "wall_s", 1)["run_id"].tolist() == ["fast"]
    assert top_runs(table, "val_loss", None)["run_id"].tolist() == ["slow", "unfinished", "fast"]
    assert top_runs(table, "test_acc", None)["run_id"].tolist() == ["slow", "fast", "unfinished"]  # missing: last


def test_an_unknown_metric_is_refused_before_any_search(monkeypatch):
    """`-P metric=test_loss` (a typo, a metric no column holds) was refused only once every run's histories and scores
    had been read (20 s for 400 runs in SQLite, minutes on a server), and the list of columns it gave left out
    val_images_in_train and test_images_in_train, which sort too."""
    from pipeline import compare, config
    from pipeline.tracking import steps

    monkeypatch.setattr(steps, "search_train_runs", lambda *args: pytest.fail("searched"))
    with pytest.raises(config.ConfigError, match=r"^metric: must be one of epochs, val_acc, best_val_acc, test_acc, "
                                                 r"wall_s, images_per_s, val_images_in_train, test_images_in_train, "
                                                 r"got 'test_loss'$"):
        compare.run(metric="test_loss")


def test_malformed_run_ids_are_refused_before_any_search(store, monkeypatch):
    import mlflow

    from pipeline import config
    from pipeline.tracking import steps

    good = "0123456789abcdef0123456789abcdef"
    with monkeypatch.context() as patch:
        patch.setattr(mlflow, "search_runs", lambda *args, **kwargs: pytest.fail("searched"))
        for bad in ("x'y", good.upper(), good[:31]):
            with pytest.raises(config.ConfigError, match=r"^run_ids: not a run id \(32 lowercase hex characters\): "
                                                         f"{re.escape(repr(bad))}$"):
                steps.search_train_runs(None, [good, bad])

    # From the command line: one error line, exit status 2, no comparison run.
    done = subprocess.run([sys.executable, "-m", "pipeline.compare", "--run-ids", f"{good},x'y"], env=store, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "error: run_ids: not a run id (32 lowercase hex characters): \"x'y\""
    assert mlflow.search_runs(search_all_experiments=True, filter_string="tags.step = 'compare'").empty


def test_a_run_trained_on_a_local_dataset_file_names_its_digest(store, tmp_path):
    """A train run given a local dataset file (no prepare run to read the digest from) takes it from the
    dataset.json prepare wrote beside the file."""
    import mlflow

    from pipeline.tracking import describe_train_run

    (tmp_path / "dataset.json").write_text(json.dumps({"sha256": "ab" * 32}))
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("e2e").experiment_id) as run:
        mlflow.log_params({"dataset_uri": f"file://{tmp_path / 'dataset.npz'}", "train.epochs": "3"})
    assert f"sha256 `{'ab' * 32}`" in describe_train_run(run.info.run_id)


def test_a_train_run_described_by_two_registers_at_once_is_described_not_a_traceback(store, monkeypatch):
    """Two registers describing one train run at once: each found no description, both inserted one, and the second
    failed on a traceback (IntegrityError: UNIQUE constraint failed: tags.key, tags.run_uuid)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import describe_train_run

    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("e2e").experiment_id) as run:
        mlflow.log_params({"train.epochs": "3"})
    real, calls = mlflow.MlflowClient.set_tag, []

    def raced(self, run_id, key, value, *args, **kwargs):  # the other register's insert lands first
        calls.append(key)
        if len(calls) == 1:
            real(self, run_id, key, "the other register's", *args, **kwargs)
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid")
        return real(self, run_id, key, value, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", raced)
    note = describe_train_run(run.info.run_id)
    assert calls == ["mlflow.note.content"] * 2
    assert mlflow.get_run(run.info.run_id).data.tags["mlflow.note.content"] == note
    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", lambda *a, **k: (_ for _ in ()).throw(
        MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")))  # any other failure is not taken for the race
    with pytest.raises(MlflowException, match="no such run"):
        describe_train_run(run.info.run_id, overwrite=True)


def test_test_accs_measured_on_different_test_splits_are_marked(monkeypatch):
    """A model evaluated again on other test images (another copy, a subset) ranked first by test_acc among runs
    scored on the full test split, and nothing in the table said so."""
    import pandas as pd

    from pipeline import compare

    scores = {"models:/m-a": (0.34, "7a930fdd5b92" + "0" * 52), "models:/m-b": (0.22, "57f856aa645c" + "0" * 52),
              "models:/m-c": (0.20, "57f856aa645c" + "0" * 52)}
    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({"test_acc": scores[uri][0]}, scores[uri][1]))
    runs = pd.DataFrame({"run_id": list("abc"), "tags.mlflow.runName": list("abc"), "params.train.lr": ["0.1"] * 3,
                         "tags.model_uri": list(scores), "start_time": pd.NaT, "end_time": pd.NaT})
    histories = {r: pd.Series({1: 0.5}) for r in "abc"}
    table = compare.top_runs(compare.build_table(runs, histories), "test_acc", None)
    assert table["test_data"].tolist() == ["7a930fdd5b92", "57f856aa645c", "57f856aa645c"]
    assert list(table.columns).index("test_data") == list(table.columns).index("test_acc") + 1
    assert compare.test_data_note(table).startswith("test_acc was measured on 2 different test splits")
    assert compare.test_data_note(table.tail(2)) == ""

    scores["models:/m-a"] = (0.34, scores["models:/m-b"][1])  # one test split: no column, no note
    table = compare.build_table(runs, histories)
    assert "test_data" not in table and compare.test_data_note(table) == ""


def test_val_accs_measured_on_other_images_or_on_the_test_split_are_marked(monkeypatch):
    """compare ranked val_acc across runs validated on other images, one of them on the test split itself
    (train.validation_fraction 0: its val_acc a test score, ranked first), and nothing in the table said so."""
    import pandas as pd

    from pipeline import compare
    from pipeline.tracking import json_digest

    evaluated = {"models:/m-e": "3" * 64}  # an older run validated on the test split, evaluated on it
    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({}, evaluated.get(uri)))
    runs = pd.DataFrame({"run_id": list("abcde"), "tags.mlflow.runName": list("abcde"),
                         "params.train.validation_fraction": ["0.0", "0.1", "0.1", "0.1", "0.0"],
                         "params.train.seed": "0", "params.dataset_uri": "'runs:/p/dataset/dataset.npz'",
                         "tags.val_data_sha256": ["1" * 64, "2" * 64, "2" * 64, None, None],  # None: older runs
                         "tags.model_uri": [f"models:/m-{r}" for r in "abcde"],
                         "start_time": pd.NaT, "end_time": pd.NaT})
    histories = {r: pd.Series({1: 0.5}) for r in "abcde"}
    table = compare.build_table(runs, histories)
    older = "params:" + json_digest(["runs:/p/dataset/dataset.npz", "0.1", "0"])[:12]
    assert table["val_data"].tolist() == ["test split 111111111111", "222222222222", "222222222222", older,
                                          "test split 333333333333"]
    assert list(table.columns).index("val_data") == list(table.columns).index("best_val_acc") + 1
    note = compare.val_data_note(table)
    assert note.startswith("val_acc and best_val_acc were measured on 4 different validation sets")
    assert "`params:` for a run from before that was recorded" in note
    assert "The rows whose val_data starts `test split` (2) validated on the test split" in note
    # val_acc.png too: the curves of other validation images drawn alike read as comparable
    figure = compare.curves_figure(table, histories, "val_acc")
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [
        f"{r} ({r}, val_data {v})" for r, v in zip(table["run"], table["val_data"], strict=True)]
    assert figure.axes[0].get_title() == "val_acc of 5 training runs, on 4 validation sets (val_data)"

    same = compare.build_table(runs.iloc[1:3], histories)  # the same held-out images: no column, no note
    assert "val_data" not in same and compare.val_data_note(same) == ""
    assert [t.get_text() for t in compare.curves_figure(same, histories, "val_acc").legends[0].get_texts()] == [
        "b (b)", "c (c)"]
    alone = compare.build_table(runs.iloc[:1], histories)  # one run, but on the test split: still said
    assert alone["val_data"].tolist() == ["test split 111111111111"]
    assert compare.val_data_note(alone).startswith("The rows whose val_data starts `test split` (1) validated on the "
                                                   "test split (train.validation_fraction 0): their val_acc is a test "
                                                   "score")


def test_test_accs_that_count_training_images_are_marked(monkeypatch):
    """A model whose test split overlapped its training data ranked first by test_acc, nothing in the table
    saying its score was partly on images it had learned."""
    import pandas as pd

    from pipeline import compare
    from pipeline.tracking import markdown_table

    scores = {"models:/m-a": {"test_acc": 0.9, "test_images_in_train": 64.0},
              "models:/m-b": {"test_acc": 0.8, "test_images_in_train": 0.0}, "models:/m-c": {"test_acc": 0.7}}
    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: (scores[uri], "0" * 64))
    runs = pd.DataFrame({"run_id": list("abc"), "tags.mlflow.runName": list("abc"), "params.train.lr": ["0.1"] * 3,
                         "tags.model_uri": list(scores), "start_time": pd.NaT, "end_time": pd.NaT})
    histories = {r: pd.Series({1: 0.5}) for r in "abc"}
    table = compare.top_runs(compare.build_table(runs, histories), "test_acc", None)
    assert list(table.columns).index("test_images_in_train") == list(table.columns).index("test_acc") + 1
    assert table["test_images_in_train"].tolist()[:2] == [64, 0] and pd.isna(table["test_images_in_train"][2])
    note = compare.test_data_note(table)
    assert note.startswith("The test_acc of 1 run counts test images the model was trained on")
    assert "| 64 " in markdown_table(table) and "<NA>" not in markdown_table(table)
    table["wall_s"], table["images_per_s"] = [61.25, 2.0, float("nan")], [1801.4785, 900.5, float("nan")]
    shown = markdown_table(table, compare.DECIMALS)  # seconds to a tenth, images/s whole, the rest as before
    assert "| 61.2 " in shown and "| 1801 " in shown and "| 900 " in shown and "| 0.9000 " in shown
    scores["models:/m-a"]["test_images_in_train"] = 0.0  # none anywhere: no column, no note
    table = compare.build_table(runs, histories)
    assert "test_images_in_train" not in table and compare.test_data_note(table) == ""


def test_val_accs_that_count_images_trained_on_are_marked(monkeypatch):
    """A run whose held-out images had copies among the images it trained on ranked first by val_acc (as a sweep
    picks its winner), nothing in the table saying its score was partly on images it had learned."""
    import math

    import pandas as pd

    from pipeline import compare
    from pipeline.tracking import markdown_table

    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({"test_acc": 0.5}, "0" * 64))
    runs = pd.DataFrame({"run_id": list("abc"), "tags.mlflow.runName": list("abc"), "params.train.lr": ["0.1"] * 3,
                         "params.train.validation_fraction": ["0.1"] * 3, "tags.val_data_sha256": ["1" * 64] * 3,
                         "metrics.val_images_in_train": [12.0, 0.0, math.nan],  # c: a run from before the metric
                         "tags.model_uri": ["models:/m-a"] * 3, "start_time": pd.NaT, "end_time": pd.NaT})
    histories = {r: pd.Series({1: acc}) for r, acc in zip("abc", (0.9, 0.8, 0.7), strict=True)}
    table = compare.top_runs(compare.build_table(runs, histories), "val_acc", None)
    assert list(table.columns).index("val_images_in_train") == list(table.columns).index("best_val_acc") + 1
    assert table["val_images_in_train"].tolist()[:2] == [12, 0] and pd.isna(table["val_images_in_train"][2])
    assert compare.val_data_note(table).startswith("The val_acc of 1 run counts images it was measured on that are "
                                                   "also images its model trained on")
    assert "| 12 " in markdown_table(table) and "<NA>" not in markdown_table(table)
    runs["metrics.val_images_in_train"] = [0.0, 0.0, math.nan]  # none anywhere: no column, no note
    table = compare.build_table(runs, histories)
    assert "val_images_in_train" not in table and compare.val_data_note(table) == ""


def test_runs_with_equal_scores_are_listed_oldest_first(store):
    """A sweep registers the first of its trials with equal val_acc (held-out splits of a few hundred images make
    ties common), but its comparison listed the newest of them on top, as if it had won."""
    from mlflow import MlflowClient

    from pipeline import compare

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    ids = []
    for start, val_acc in ((1_000, 0.99), (2_000, 0.97), (3_000, 0.99)):  # trials 0, 1, 2 of a sweep
        run = client.create_run(experiment, start_time=start, tags={"step": "train"}).info.run_id
        client.log_param(run, "train.epochs", "2")  # a training run logs its params
        client.log_metric(run, "val_acc", val_acc, step=1)
        client.set_terminated(run, end_time=start + 500)
        ids.append(run)
    table = compare.run("e2e", metric="val_acc")["table"]
    assert table["run_id"].tolist() == [ids[0], ids[2], ids[1]]


def test_runs_trained_on_other_data_of_the_same_data_params_are_marked(store):
    """Two runs of one `data.source`, an image folder with half its training images deleted between them, showed as two
    rows of the same params (validated on the same test split): nothing said one had trained on half the images.
    A column `data` names the digest of each run's dataset (its dataset input's; a run from before that input, its
    prepare run's `dataset_sha256`) where they differ, and a line above the table says so."""
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    from pipeline import compare

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    ids = []
    for start, digest in ((1_000, "a" * 64), (2_000, "b" * 64), (3_000, "a" * 64)):
        prepare = client.create_run(experiment, tags={"step": "prepare", "dataset_sha256": digest}).info.run_id
        run = client.create_run(experiment, start_time=start, tags={
            "step": "train", "dataset_uri": f"runs:/{prepare}/dataset/dataset.npz"}).info.run_id
        client.log_param(run, "data.source", "images")
        if start < 3_000:  # the last run as logged before train runs had a dataset input
            found = mlflow.data.from_numpy(np.zeros((2, 1)), name="images", digest=digest[:32])._to_mlflow_entity()
            client.log_inputs(run, [DatasetInput(found, [InputTag("mlflow.data.context", "train")])])
        client.log_metric(run, "val_acc", 0.5, step=1)
        client.set_terminated(run, end_time=start + 500)
        ids.append(run)
    comparison = compare.run("e2e", metric="val_acc")
    assert comparison["table"]["data"].tolist() == ["a" * 12, "b" * 12, "a" * 12]
    assert "The runs trained on 2 different datasets (column data" in comparison["markdown"]
    one = compare.run("e2e", run_ids=[ids[0], ids[2]], metric="val_acc")
    assert "data" not in one["table"] and "different datasets" not in one["markdown"]


def test_training_runs_left_out_as_unfinished_are_counted_above_the_table(store):
    """Every training run of an experiment compared showed the finished ones alone, with nothing to say that two more
    were still training or had failed: the comparison looked complete with runs missing from it."""
    from mlflow import MlflowClient

    from pipeline import compare, config

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    ids = {}
    for name, status, tags in (("done", "FINISHED", {}), ("live", "RUNNING", {}), ("failed", "FAILED", {}),
                               ("pruned", "KILLED", {"pruned_at_epoch": "1"})):
        run = client.create_run(experiment, start_time=1_000, tags={"step": "train", **tags}).info.run_id
        client.log_param(run, "train.epochs", "2")  # a training run logs its params
        client.log_metric(run, "val_acc", 0.5, step=1)
        if status != "RUNNING":
            client.set_terminated(run, status=status, end_time=2_000)
        ids[name] = run
    comparison = compare.run("e2e", metric="val_acc")
    assert comparison["table"]["run_id"].tolist() == [ids["done"]]
    assert comparison["markdown"].startswith("Left out: 2 training runs not finished (1 FAILED, 1 RUNNING: still "
                                             "training, or stopped before the end)")  # a pruned trial is no loss
    assert "Left out" not in compare.run("e2e", run_ids=[ids["done"]], metric="val_acc")["markdown"]
    # none finished: the error says what there is, not only that nothing compares
    client.delete_run(ids["done"])
    with pytest.raises(config.ConfigError, match=r"^experiment: no finished training runs \(tag step='train'\) in "
                                                 r"experiment 'e2e' \(not finished: 1 FAILED, 1 RUNNING\)$"):
        compare.run("e2e", metric="val_acc")


def test_diverged_training_runs_left_out_are_counted_as_diverged(store):
    """A training run that diverged (FAILED, its failure_reason "training diverged: ...") was counted with the runs
    "still training, or stopped before the end", and named by id refused as "FAILED": nothing said its training had
    gone NaN. The line above the table, the error where none finished and the refusal of its id each say diverged."""
    from mlflow import MlflowClient

    from pipeline import compare, config

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    ids = {}
    for name, status, reason in (("done", "FINISHED", None), ("failed", "FAILED", "DataError: disk gone"),
                                 ("nan", "FAILED", "training diverged: loss became nan in epoch 1; nothing was "
                                                   "registered. Lower train.lr (now 1e+12) or check the data"),
                                 ("nan2", "FAILED", "training diverged: val_loss became nan in epoch 2; ...")):
        run = client.create_run(experiment, start_time=1_000, tags={"step": "train"}).info.run_id
        client.log_param(run, "train.epochs", "2")
        client.log_metric(run, "val_acc", 0.5, step=1)
        if reason:
            client.set_tag(run, "failure_reason", reason)
        client.set_terminated(run, status=status, end_time=2_000)
        ids[name] = run
    assert compare.run("e2e", metric="val_acc")["markdown"].startswith(
        "Left out: 3 training runs not finished (2 diverged, 1 FAILED: still training, or stopped before the end): "
        "only finished runs compare.")
    with pytest.raises(config.ConfigError) as refused:
        compare.run(run_ids=[ids["done"], ids["nan"]], metric="val_acc")
    assert str(refused.value) == (f"run_ids: not finished training runs: {ids['nan']} (diverged: training diverged: "
                                  f"loss became nan in epoch 1; nothing was registered. Lower train.lr (now 1e+12) or "
                                  f"check the data)")
    client.delete_run(ids["done"])
    with pytest.raises(config.ConfigError, match=r"^experiment: no finished training runs \(tag step='train'\) in "
                                                 r"experiment 'e2e' \(not finished: 2 diverged, 1 FAILED\)$"):
        compare.run("e2e", metric="val_acc")


def test_training_runs_of_another_project_in_the_store_are_left_out_saying_so(store):
    """Another project sharing the store tags its runs step=train too: every experiment compared showed them as rows,
    with a column for each of this pipeline's params (empty in theirs) and one for each of theirs (empty in ours),
    and its failed runs counted as ours not finished. A run tagged so that logged params, none of this pipeline's,
    is left out, counted above the table; named in run_ids, it is refused saying so."""
    from mlflow import MlflowClient

    from pipeline import compare, config

    client = MlflowClient()
    ours, theirs = client.get_experiment_by_name("e2e").experiment_id, client.create_experiment("elasticnet")
    ids = {}
    for name, experiment, params, status in (("a", ours, {"train.lr": "0.1"}, "FINISHED"),
                                             ("b", ours, {"train.lr": "0.2"}, "FINISHED"),
                                             ("x", theirs, {"alpha": "0.1", "l1_ratio": "0.5"}, "FINISHED"),
                                             ("y", theirs, {"alpha": "0.5", "l1_ratio": "0.5"}, "FINISHED"),
                                             ("z", theirs, {"alpha": "0.9"}, "FAILED")):
        run = client.create_run(experiment, start_time=1_000, tags={"step": "train"}).info.run_id
        for key, value in params.items():
            client.log_param(run, key, value)
        client.log_metric(run, "val_acc", 0.5, step=1)
        client.set_terminated(run, status=status, end_time=2_000)
        ids[name] = run
    comparison = compare.run(metric="val_acc")
    assert sorted(comparison["table"]["run_id"]) == sorted([ids["a"], ids["b"]])
    assert [c for c in comparison["table"] if c.startswith(("train.", "alpha", "l1"))] == ["train.lr"]
    assert comparison["markdown"].startswith(
        "Left out: 2 training runs of another project (tag step=train, but none of this pipeline's params).\n\n")
    assert "not finished" not in comparison["markdown"]  # their failed run is none of ours
    with pytest.raises(config.ConfigError, match=f"^run_ids: not finished training runs: {ids['x']} \\(of another "
                                                 r"project: none of this pipeline's params\)$"):
        compare.run(run_ids=[ids["a"], ids["x"]], metric="val_acc")
    with pytest.raises(config.ConfigError, match=r"^experiment: no finished training runs \(tag step='train'\) in "
                                                 r"experiment 'elasticnet' \(left out: 2 of another project\)$"):
        compare.run("elasticnet", metric="val_acc")


def test_training_runs_without_params_are_left_out_and_a_nan_val_acc_reads_nan(store):
    """A run tagged step=train that logged no params (made by hand, or a start that failed before it logged them) was
    compared as a run: a row of empty params ranked among the real ones, here first. It is left out, counted above
    the table, and refused by id saying why. A val_acc logged as NaN (a diverged run) was an empty cell, as for a run
    that logged none: it reads NaN, and the line above the table says so."""
    import math

    from mlflow import MlflowClient

    from pipeline import compare, config

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    ids = {}
    for name, params, values in (("real", {"train.lr": "0.1"}, [0.5, 0.6]),
                                 ("diverged", {"train.lr": "10"}, [0.2, math.nan]), ("bare", {}, [0.9])):
        run = client.create_run(experiment, start_time=1_000, run_name=name, tags={"step": "train"}).info.run_id
        for key, value in params.items():
            client.log_param(run, key, value)
        for epoch, value in enumerate(values, 1):
            client.log_metric(run, "val_acc", value, step=epoch)
        client.set_terminated(run, end_time=2_000)
        ids[name] = run
    comparison = compare.run("e2e", metric="val_acc")
    assert comparison["table"]["run_id"].tolist() == [ids["real"], ids["diverged"]]
    markdown = comparison["markdown"]
    assert markdown.startswith(
        "No val_acc for 1 run (of 2; 1 logged it as NaN, its training diverged): they are listed last, in no order "
        "by it.\n\nLeft out: 1 training run without params (tag step=train, but no params logged: made by hand, or "
        "a start that failed before it logged them).\n\n"), markdown
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]
    cells = dict(zip(rows[0], next(row for row in rows if row[0] == "diverged"), strict=True))
    assert (cells["val_acc"], cells["best_val_acc"], cells["epochs"]) == ("NaN", "0.2000", "2"), cells
    with pytest.raises(config.ConfigError, match=f"^run_ids: not finished training runs: {ids['bare']} \\(no params "
                                                 r"logged: made by hand, or a start that failed before it logged "
                                                 r"them\)$"):
        compare.run(run_ids=[ids["bare"]], metric="val_acc")


def test_runs_csv_writes_a_nan_val_acc_as_nan_and_none_logged_as_empty(store):
    """runs.csv wrote a val_acc logged as NaN (a diverged run) as an empty cell, as for a run that logged none
    (pandas's default), while runs.md showed NaN: it reads NaN there too."""
    import math

    import mlflow
    from mlflow import MlflowClient

    from pipeline import compare

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    for name, lr, values in (("diverged", "10", [0.2, math.nan]), ("untrained", "0.1", [])):
        run = client.create_run(experiment, start_time=1_000, run_name=name, tags={"step": "train"}).info.run_id
        client.log_param(run, "train.lr", lr)
        for epoch, value in enumerate(values, 1):
            client.log_metric(run, "val_acc", value, step=epoch)
        client.set_terminated(run, end_time=2_000)
    comparison = compare.run("e2e", metric="val_acc")
    uri = f"{mlflow.get_run(comparison['run_id']).info.artifact_uri}/runs.csv"
    with open(mlflow.artifacts.download_artifacts(uri), newline="") as file:
        rows = {row["run"]: row for row in csv.DictReader(file)}
    assert [rows[name]["val_acc"] for name in ("diverged", "untrained")] == ["NaN", ""], rows
    assert (rows["diverged"]["best_val_acc"], rows["untrained"]["best_val_acc"]) == ("0.2", ""), rows


def test_sorting_by_images_trained_on_that_no_run_counts_keeps_the_runs_oldest_first(store):
    """`-P metric=test_images_in_train` (or val_images_in_train), a sort column the docs list, was refused as no metric
    ("must be one of epochs, val_acc, ...") wherever no run counted any such image: the column is left out then."""
    from mlflow import MlflowClient

    from pipeline import compare

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    ids = []
    for start, val_acc in ((1_000, 0.5), (2_000, 0.9)):
        run = client.create_run(experiment, start_time=start, tags={"step": "train"}).info.run_id
        client.log_param(run, "train.epochs", "2")  # a training run logs its params
        client.log_metric(run, "val_acc", val_acc, step=1)
        client.log_metric(run, "val_images_in_train", 0)
        client.set_terminated(run, end_time=start + 500)
        ids.append(run)
    for metric in ("test_images_in_train", "val_images_in_train"):
        comparison = compare.run("e2e", metric=metric)
        assert comparison["table"]["run_id"].tolist() == ids and metric not in comparison["table"]
    assert compare.run("e2e", top=1, metric="val_images_in_train")["table"]["run_id"].tolist() == ids[:1]
    # by a score none has (never evaluated): the rows are in no order by it, and the top one is no best
    unranked = compare.run("e2e", top=1, metric="test_acc")["markdown"]
    assert unranked.startswith("No test_acc for 2 runs (of 2): they are listed last, in no order by it.\n\n")
    assert "No val_acc" not in compare.run("e2e", metric="val_acc")["markdown"]


def test_a_pipe_or_a_line_break_in_a_cell_stays_in_its_cell(store):
    """A param value or run name with a line break made tabulate write a second, made-up row below its run in runs.md
    and the description (its name's second line under `run`, every other cell empty), one ranked among the runs."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline import compare

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    for start, name, source, val_acc in ((1_000, "a", "x|y.npz", 0.9), (2_000, "b\nc", "p\nq.npz", 0.8),
                                         (3_000, "d", "r\r\ns.npz", 0.7)):
        run = client.create_run(experiment, start_time=start, run_name=name, tags={"step": "train"}).info.run_id
        client.log_param(run, "data.source", source)
        client.log_metric(run, "val_acc", val_acc, step=1)
        client.set_terminated(run, end_time=start + 500)
    comparison = compare.run("e2e", metric="val_acc")
    rows = [line for line in comparison["markdown"].splitlines() if line.startswith("|")][2:]
    ids = comparison["table"]["run_id"].tolist()
    assert [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:4]] for row in rows] == [
        ["a", ids[0], "x\\|y.npz"], ["b\\nc", ids[1], "p\\nq.npz"], ["d", ids[2], "r\\ns.npz"]]
    run = mlflow.get_run(comparison["run_id"])
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/runs.md") == comparison["markdown"]
    with open(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/runs.csv"), newline="") as file:
        assert [row["data.source"] for row in csv.DictReader(file)] == ["x|y.npz", "p\nq.npz", "r\r\ns.npz"]


def test_the_printed_table_and_runs_md_say_what_the_rows_are_sorted_by(store, in_process):
    """The line naming the sort ("Training runs by val_acc, best (highest) first") was in the comparison run's
    description only: the printed table and runs.md did not say which column ranked the rows, or which way."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    for start, val_acc in ((1_000, 0.5), (2_000, 0.9)):
        run = client.create_run(experiment, start_time=start, tags={"step": "train"}).info.run_id
        client.log_param(run, "train.epochs", "2")  # a training run logs its params
        client.log_metric(run, "val_acc", val_acc, step=1)
        client.set_terminated(run, end_time=start + 500)
    for metric, heading in (("val_acc", "Training runs by val_acc, best (highest) first:"),
                            ("wall_s", "Training runs by wall_s, best (lowest) first:")):
        done = in_process("compare", "--experiment", "e2e", "--metric", metric)
        assert done.returncode == 0, done.stderr[-2000:]
        lines = done.stdout.splitlines()
        assert lines[lines.index(heading) + 2].startswith("| run "), done.stdout
        comparison = mlflow.get_run(done.stdout.split("comparison run ")[-1].split(":")[0])
        runs_md = mlflow.artifacts.load_text(f"{comparison.info.artifact_uri}/runs.md")
        assert heading in runs_md.splitlines() and runs_md in done.stdout
        assert comparison.data.tags["mlflow.note.content"].count(heading) == 1


def test_runs_trained_by_other_code_are_marked(monkeypatch):
    """The same params trained before and after an edit of the training code showed as two rows with nothing
    between them differing but their scores."""
    import pandas as pd

    from pipeline import compare

    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({}, None))
    runs = pd.DataFrame({"run_id": list("abc"), "tags.mlflow.runName": list("abc"), "params.train.lr": ["0.1"] * 3,
                         "tags.model_uri": [None] * 3, "start_time": pd.NaT, "end_time": pd.NaT,
                         "tags.train_code": ["1" * 64, "2" * 64, None]})  # None: a run from before the tag
    histories = {r: pd.Series({1: 0.5}) for r in "abc"}
    table = compare.build_table(runs, histories)
    assert table["train_code"].tolist()[:2] == ["1" * 12, "2" * 12] and pd.isna(table["train_code"][2])
    assert list(table.columns)[:3] == ["run", "run_id", "train_code"]  # no param differs
    runs["tags.train_code"] = "1" * 64
    assert "train_code" not in compare.build_table(runs, histories)


def test_runs_of_the_same_params_trained_in_another_precision_or_backend_are_marked(monkeypatch):
    """`train.precision: auto` is bfloat16 on a GPU and float32 on a CPU: the two runs of one params file showed as rows
    with no column between them differing, their val_accs apart for no reason the table gave. Whole values: a
    12-character cut made `mixed_bfloat16` `mixed_bfloat`."""
    import pandas as pd

    from pipeline import compare

    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({}, None))
    runs = pd.DataFrame({"run_id": list("abc"), "tags.mlflow.runName": list("abc"),
                         "params.train.precision": ["auto"] * 3, "tags.model_uri": [None] * 3,
                         "start_time": pd.NaT, "end_time": pd.NaT,
                         "tags.train_code": ["1" * 64] * 3, "tags.backend": ["tensorflow", "jax", "tensorflow"],
                         "tags.dtype_policy": ["mixed_bfloat16", "float32", "float32"],
                         "tags.jit_compile": ["true"] * 3, "tags.replicas": ["1"] * 3})
    histories = {r: pd.Series({1: 0.5}) for r in "abc"}
    table = compare.build_table(runs, histories)
    assert list(table.columns)[:4] == ["run", "run_id", "backend", "dtype_policy"]  # only those that differ
    assert table["dtype_policy"].tolist() == ["mixed_bfloat16", "float32", "float32"]
    assert table["backend"].tolist() == ["tensorflow", "jax", "tensorflow"]


def test_runs_trained_at_other_lrs_by_train_lr_scaling_are_marked(monkeypatch):
    """train.lr_scaling linear trains at train.lr * batch / 128: two runs of train.lr 0.1 at batches 128 and 256
    trained at 0.1 and 0.2, and the table showed train.batch_size alone differing, the lr the same."""
    import pandas as pd

    from pipeline import compare

    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({}, None))
    runs = pd.DataFrame({"run_id": list("abc"), "tags.mlflow.runName": list("abc"), "tags.model_uri": [None] * 3,
                         "start_time": pd.NaT, "end_time": pd.NaT, "params.train.lr": ["0.1"] * 3,
                         "params.train.batch_size": ["128", "256", "256"],
                         "params.train.lr_scaling": ["linear", "linear", "none"],
                         "tags.effective_lr": ["0.1", "0.2", "0.1"]})
    histories = {r: pd.Series({1: 0.5}) for r in "abc"}
    table = compare.build_table(runs, histories)
    assert table["effective_lr"].tolist() == ["0.1", "0.2", "0.1"]
    # no column where every run trained at train.lr, or at one lr, or a run from before the tag
    runs["params.train.lr_scaling"], runs["tags.effective_lr"] = "none", ["0.1", "0.1", None]
    assert "effective_lr" not in compare.build_table(runs, histories)
    runs["params.train.lr"], runs["tags.effective_lr"] = ["0.1", "0.2", "0.3"], ["0.1", "0.2", "0.3"]
    assert "effective_lr" not in compare.build_table(runs, histories)


def test_runs_timed_on_other_hardware_are_marked(monkeypatch):
    """wall_s and images_per_s of runs trained on two machines (a team's hosts, a laptop and a server) stood side by
    side with nothing saying they were timed on other hardware: a faster machine read as faster params."""
    import pandas as pd

    from pipeline import compare
    from pipeline.fitting import hardware

    assert f"{os.cpu_count()} cores" in hardware()  # this machine's, as a train run tags it
    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({}, None))
    runs = pd.DataFrame({"run_id": list("abc"), "tags.mlflow.runName": list("abc"), "tags.model_uri": [None] * 3,
                         "start_time": pd.NaT, "end_time": pd.NaT, "params.train.lr": ["0.1"] * 3,
                         "tags.hardware": ["AMD EPYC 7B13, 2 cores", "AMD EPYC 7B13, 2 cores; 1 x NVIDIA H100",
                                           None]})
    histories = {r: pd.Series({1: 0.5}) for r in "abc"}
    table = compare.build_table(runs, histories)
    assert table["hardware"].tolist()[:2] == ["AMD EPYC 7B13, 2 cores", "AMD EPYC 7B13, 2 cores; 1 x NVIDIA H100"]
    runs["tags.hardware"] = "AMD EPYC 7B13, 2 cores"
    assert "hardware" not in compare.build_table(runs, histories)


def test_a_run_extended_or_resumed_across_a_code_change_is_marked(monkeypatch):
    """A killed run of 3 epochs extended to 6 (`resume=<id>`, epochs=6) trained its first 3 on the 3-epoch schedule,
    yet its train.epochs column said 3 beside a straight run's 6; one resumed under other code showed the new code's
    train_code alone, the same as a run trained on it throughout. Each cell now says what happened (its tag)."""
    import pandas as pd

    from pipeline import compare

    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({}, None))
    runs = pd.DataFrame({"run_id": list("abc"), "tags.mlflow.runName": list("abc"), "tags.model_uri": [None] * 3,
                         "start_time": pd.NaT, "end_time": pd.NaT, "params.train.epochs": ["3", "6", "6"],
                         "tags.extended_epochs": ["3 -> 6", None, None],
                         "tags.train_code": ["2" * 64] * 3,
                         "tags.resumed_across_code": [None, f"{'1' * 12} -> {'2' * 12} after epoch 2", None]})
    histories = {r: pd.Series({e: 0.5 for e in range(1, 7)}) for r in "abc"}
    table = compare.build_table(runs, histories)
    assert table["train.epochs"].tolist() == ["3 -> 6", "6", "6"]
    assert table["train_code"].tolist() == ["2" * 12, f"{'1' * 12} -> {'2' * 12} after epoch 2", "2" * 12]
    runs["tags.extended_epochs"], runs["tags.resumed_across_code"] = None, None
    runs["params.train.epochs"] = "6"
    assert not {"train.epochs", "train_code"} & set(compare.build_table(runs, histories))


def test_the_parameters_mlflow_run_logs_on_a_train_run_are_no_columns(monkeypatch):
    """`mlflow run . -e train -P params=...` logs its entry point's parameters on the train run as given (`''` where
    left out): they showed as columns `params`, `data`, `overrides`, `resume` beside the dotted params they resolve
    to, and `epochs` (`''`) took the place of the epochs column. The differing params come in the same order every
    time."""
    import pandas as pd

    from pipeline import compare

    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({}, None))
    entry = {f"params.{k}": ["params/tiny.yaml" if k == "params" else "''", None, None]
             for k in ("params", "epochs", "data", "overrides", "dataset_uri", "resume")}
    runs = pd.DataFrame({"run_id": list("abc"), "tags.mlflow.runName": list("abc"), "tags.model_uri": [None] * 3,
                         "start_time": pd.NaT, "end_time": pd.NaT, **entry,
                         "params.train.lr": ["0.1", "0.1", "0.2"], "params.model.arch": ["preact"] * 2 + ["resnet9"],
                         # where each run went: not tracking.experiment, which `mlflow run --experiment-name` overrides
                         "params.tracking.experiment": ["cifar10-resnet"] * 2 + ["e2e"],
                         "experiment_name": ["e2e", "lr-study", "e2e"]})
    histories = {r: pd.Series({1: 0.5, 2: 0.6, 3: 0.7}) for r in "abc"}
    table = compare.build_table(runs, histories)
    assert list(table.columns)[:5] == ["run", "run_id", "experiment", "model.arch", "train.lr"]
    assert table["experiment"].tolist() == ["e2e", "lr-study", "e2e"]
    assert "experiment" not in compare.build_table(runs.iloc[[0, 2]], histories)  # one experiment: no column
    assert not {"params", "data", "overrides", "dataset_uri", "resume", "tracking.experiment"} & set(table.columns)
    assert table["epochs"].tolist() == [3, 3, 3]
    assert compare.differing_params(runs[list(reversed(runs.columns))]) == ["params.model.arch", "params.train.lr"]


def test_params_that_differ_only_where_they_have_no_effect_are_no_columns(monkeypatch):
    """Runs differing in train.nesterov where train.momentum was 0, in train.ema_momentum where train.ema was off, or in
    preact's model.block under resnet9 showed those as differing columns, as if they had set the runs apart. A column
    whose values differ only where they have no effect (tag inert_params; for a run from before it, its params read
    by config.inert_params) is left out, and said to be; where the runs it has effect in differ, it stays, the
    others' cells `(inert)`."""
    import pandas as pd

    from pipeline import compare, config

    monkeypatch.setattr(compare, "model_score", lambda uri, *dataset: ({}, None))
    inert = [{"train.nesterov": "train.momentum 0.0", "train.ema_momentum": "train.ema false"},
             {"train.ema_momentum": "train.ema false"}, {}, None]  # None: a run from before the tag
    runs = pd.DataFrame({"run_id": list("abcd"), "tags.mlflow.runName": list("abcd"), "tags.model_uri": [None] * 4,
                         "start_time": pd.NaT, "end_time": pd.NaT,
                         "tags.inert_params": [json.dumps(keys) if keys is not None else None for keys in inert],
                         "params.train.momentum": ["0.0", "0.9", "0.9", "0.9"],
                         "params.train.nesterov": ["true", "false", "false", "false"],  # a: no momentum to apply it
                         "params.train.ema": ["false", "false", "true", "true"],
                         "params.train.ema_momentum": ["0.5", "0.99", "0.999", "0.99"],  # b's does nothing
                         "params.model.arch": ["preact"] * 3 + ["resnet9"],
                         "params.model.widths": ["[64, 128, 256]"] * 3 + ["[64, 128, 256, 512]"],
                         "params.model.block": ["bottleneck"] * 3 + ["basic"]})  # d: resnet9's, read from its params
    histories = {r: pd.Series({1: 0.5}) for r in "abcd"}
    table = compare.build_table(runs, histories)
    assert not {"train.nesterov", "model.block"} & set(table.columns)
    assert table["train.momentum"].tolist() == ["0.0", "0.9", "0.9", "0.9"]
    assert table["train.ema_momentum"].tolist() == ["(inert)", "(inert)", "0.999", "0.99"]
    assert compare.inert_note(runs, table) == (
        "Left out: model.block, train.nesterov, whose values differ only in runs where they have no effect given "
        "their other params; a cell `(inert)` is a param without effect in its run (tag inert_params of each run "
        "says why).\n\n")
    marked = runs.iloc[1:].drop(columns="params.model.block")  # b's ema_momentum beside c's and d's, none left out
    assert compare.inert_note(marked, compare.build_table(marked, histories)) == (
        "A cell `(inert)` is a param without effect in its run (tag inert_params of each run says why).\n\n")
    alike = compare.build_table(runs.iloc[:2], histories)  # ema_momentum too differs only where it does nothing
    assert "train.ema_momentum" not in alike
    assert compare.inert_note(runs.iloc[:2], alike).startswith("Left out: train.ema_momentum, train.nesterov, whose ")
    assert "(inert)" not in compare.inert_note(runs.iloc[:2], alike)
    assert compare.inert_note(runs.iloc[2:3], compare.build_table(runs.iloc[2:3], histories)) == ""

    # hundreds of runs from before the tag: default.yaml was parsed again for each, twice (37 s of 46 for 400 runs)
    reads, read = [], config.read_yaml
    monkeypatch.setattr(config, "read_yaml", lambda *args, **kwargs: reads.append(args) or read(*args, **kwargs))
    many = pd.concat([runs.iloc[3:]] * 100, ignore_index=True).assign(run_id=[f"{i:032x}" for i in range(100)])
    compare.inert_note(many, compare.build_table(many, dict.fromkeys(many["run_id"], histories["d"])))
    assert len(reads) <= 1


def test_test_acc_is_the_models_score_on_the_data_it_trained_on(store):
    """A later evaluation on other test images (a data.max_test subset) was the row's test_acc: compare ranked
    that 0.99 first, over a model that beat it on the whole test split. So was one whose evaluate run failed."""
    import mlflow

    from pipeline import compare
    from pipeline.tracking import steps
    from tests.test_failures import Echo

    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    for name, evaluations in (("a", [("runs:/p/full", 0.9)]),
                              ("b", [("runs:/p/full", 0.8), ("runs:/q/part", 0.99), ("runs:/p/full", 0.95, "FAILED")])):
        with mlflow.start_run(experiment_id=experiment_id, run_name=name,
                              tags={"step": "train", "dataset_uri": "runs:/p/full"}):
            mlflow.log_param("train.epochs", "2")  # a training run logs its params
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            model_uri = info.model_uri
            mlflow.set_tag("model_uri", model_uri)
            mlflow.log_metric("val_acc", 0.8, step=0)
        for dataset_uri, acc, *status in evaluations:
            with mlflow.start_run(experiment_id=experiment_id):
                steps.log_evaluation({"model_uri": model_uri, "dataset_uri": dataset_uri}, {"test_acc": acc},
                                     model_uri, dataset_uri[-4:] * 16)
                mlflow.end_run(*status)
    table = compare.run(experiment="e2e", metric="test_acc")["table"]
    assert table[["run", "test_acc"]].values.tolist() == [["a", 0.9], ["b", 0.8]]


def test_a_test_acc_logged_as_nan_is_no_score_of_0(store):
    """A test_acc logged as NaN on a model (a diverged model's, by other code) read back from MLflow's SQL store as 0.0
    (it keeps no NaN flag for a logged model's metrics): compare showed the run's test_acc as 0.0000, a score, ranked
    among the evaluated runs. It reads NaN, ranked after every score."""
    import math

    import mlflow

    from pipeline import compare
    from pipeline.tracking import steps
    from tests.test_failures import Echo

    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    for name, acc in (("diverged", math.nan), ("real", 0.05)):
        with mlflow.start_run(experiment_id=experiment_id, run_name=name,
                              tags={"step": "train", "dataset_uri": "runs:/p/full"}):
            mlflow.log_param("train.lr", "0.1")
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            model_uri = info.model_uri
            mlflow.set_tag("model_uri", model_uri)
        with mlflow.start_run(experiment_id=experiment_id):
            steps.log_evaluation({"model_uri": model_uri, "dataset_uri": "runs:/p/full"}, {"test_acc": acc},
                                 model_uri, "a" * 64)
    with mlflow.start_run(experiment_id=experiment_id, run_name="unevaluated",
                          tags={"step": "train", "dataset_uri": "runs:/p/full"}):
        mlflow.log_param("train.lr", "0.1")
    comparison = compare.run(experiment="e2e", metric="test_acc")
    table = comparison["table"]
    assert table["run"].tolist() == ["real", "diverged", "unevaluated"], table[["run", "test_acc"]]
    assert math.isnan(table["test_acc"].iloc[1]), table
    # its cell reads NaN, as a val_acc logged NaN does; a run never evaluated keeps an empty cell
    assert "No test_acc for 2 runs (of 3; 1 logged it as NaN, its training diverged)" in comparison["markdown"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in comparison["markdown"].splitlines()
            if line.startswith("|")]
    cells = {row[0]: dict(zip(rows[0], row, strict=True)) for row in rows[2:]}
    assert (cells["diverged"]["test_acc"], cells["unevaluated"]["test_acc"]) == ("NaN", ""), cells
    uri = f"{mlflow.get_run(comparison['run_id']).info.artifact_uri}/runs.csv"
    with open(mlflow.artifacts.download_artifacts(uri), newline="") as file:
        written = {row["run"]: row["test_acc"] for row in csv.DictReader(file)}
    assert (written["diverged"], written["unevaluated"]) == ("NaN", ""), written


def test_a_model_evaluated_under_mlflow_run_on_a_path_that_needs_quotes_shows_its_test_acc(store, tmp_path):
    """`mlflow run . -e evaluate -P dataset_uri=<a path with a space>` logs that -P shell-quoted on the evaluate run
    (`'/data/my set/dataset.npz'`): compare took it for an evaluation of another dataset than the one the model trained
    on (the train run's tag, unquoted), and the row showed no test_acc."""
    import mlflow
    from mlflow.projects import _project_spec

    from pipeline import compare
    from pipeline.tracking import steps
    from tests.test_failures import Echo

    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    dataset_uri = str(tmp_path / "my set (v2)" / "dataset.npz")
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "train", "dataset_uri": dataset_uri}):
        mlflow.log_param("train.epochs", "2")  # a training run logs its params
        model_uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
        mlflow.set_tag("model_uri", model_uri)
        mlflow.log_metric("val_acc", 0.8, step=1)
    given = {"model_uri": model_uri, "dataset_uri": dataset_uri}
    logged, _ = _project_spec.load_project(ROOT).get_entry_point("evaluate").compute_parameters(given, None)
    assert logged["dataset_uri"] != dataset_uri  # what `mlflow run` logs: quoted for the shell
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_params(logged)
        steps.log_evaluation(given, {"test_acc": 0.9}, model_uri, "a" * 64)
    table = compare.run(experiment="e2e", metric="test_acc")["table"]
    assert table["test_acc"].tolist() == [0.9]


def test_a_comparison_too_long_for_a_description_ends_on_a_whole_row_and_says_so(store):
    """MLflow cuts a tag at 8,000 characters: the description of a comparison of 50 runs ended mid-row, unsaid."""
    from mlflow import MlflowClient

    from pipeline import compare

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    for i in range(50):
        run = client.create_run(experiment, start_time=1_000 + i, run_name=f"resnet-{i:02d}-" + "x" * 90,
                                tags={"step": "train"}).info.run_id
        client.log_param(run, "train.epochs", "2")  # a training run logs its params
        client.log_metric(run, "val_acc", i / 100, step=1)
        client.set_terminated(run, end_time=2_000)
    comparison = compare.run("e2e", metric="val_acc")
    note = client.get_run(comparison["run_id"]).data.tags["mlflow.note.content"]
    rows = [line for line in note.splitlines() if line.startswith("| resnet-")]
    assert len(note) <= 8000 and len(comparison["table"]) == 50
    assert all(line.endswith("|") for line in note.splitlines() if line.startswith("|")) and 10 < len(rows) < 50
    assert note.endswith(f"\n... and {50 - len(rows)} more rows: see runs.md for the whole table\n")


def test_a_comparison_of_more_runs_than_a_tag_holds_lists_them_all(store, tmp_path):
    """MLflow cut tag `compared_runs` at 8,000 characters: a comparison of 300 runs listed 242 ids and part of
    another, like a whole list, with only a log line to say so."""
    import mlflow

    from pipeline.tracking import steps

    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    (files := tmp_path / "files").mkdir()  # none: the comparison's own files are no part of this
    for count in (3, 300):
        ids = [f"{i:032x}" for i in range(count)]
        with mlflow.start_run(experiment_id=experiment_id) as run:
            steps.log_comparison({}, ids, "table", files)
        tags = mlflow.get_run(run.info.run_id).data.tags
        listed = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/compared_runs.txt")
        assert listed.splitlines() == ids and tags["compared_runs_count"] == str(count)
        assert tags["compared_runs"] == (",".join(ids) if count == 3 else
                                         "300 runs, too many for this tag: see artifact compared_runs.txt")


def test_the_val_acc_plot_of_many_runs_keeps_its_legend_in_the_picture_and_off_the_curves():
    """With 50 runs the legend, inside the axes, covered the curves and ran off the top of val_acc.png; a run
    named '_baseline' had no legend entry and one named 'lr $\\alpha$ ...' failed the comparison."""
    import io

    import numpy as np
    import pandas as pd

    from pipeline import compare

    ids = [f"{i:02d}" + "ab" * 15 for i in range(50)]
    names = ["_baseline", "lr $\\notacommand$ x"] + [f"resnet164-e150-b128-lr0.{i:02d}-" + "x" * 60 for i in range(48)]
    histories = {r: pd.Series(np.linspace(0.3, 0.5 + i / 100, 30), index=range(1, 31)) for i, r in enumerate(ids)}
    histories[ids[2]] = pd.Series(dtype=float)  # a run that logged no val_acc
    table = pd.DataFrame({"run": names, "run_id": ids, "epochs": [len(histories[r]) for r in ids]})
    fig = compare.curves_figure(table, histories, "val_acc")
    fig.savefig(io.BytesIO(), format="png", dpi=120)  # as plot_curves does
    fig.canvas.draw()  # lays it out again at its own dpi, where the extents below are measured
    renderer = fig.canvas.get_renderer()
    legend, axes = fig.legends[0].get_window_extent(renderer), fig.axes[0].get_tightbbox(renderer)
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1 and fig.bbox.y0 <= legend.y0
    assert legend.y1 <= fig.bbox.y1 and not legend.overlaps(fig.axes[0].get_window_extent(renderer))
    assert fig.bbox.contains(axes.x0, axes.y0) and fig.bbox.contains(axes.x1, axes.y1)
    assert len(fig.axes[0].lines) == 50  # still one curve per run
    assert all(line.get_marker() not in ("None", "") for line in fig.axes[0].lines)  # one epoch shows too
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == compare.LEGEND_RUNS + 1 and labels[-1].startswith("30 more runs")
    assert labels[:3] == ["_baseline (00ababa)", "lr \\$\\notacommand\\$ x (01ababa)",
                          f"resnet164-e150-b128-lr0.00-{'x' * 12}… (02ababa, no val_acc)"]
    styles = {(line.get_color(), line.get_linestyle()) for line in fig.legends[0].get_lines()[:-1]}
    assert len(styles) == compare.LEGEND_RUNS  # no two named curves look alike


def test_a_train_run_shows_the_dataset_it_trained_on_in_the_ui(store):
    """Only the prepare run carried a dataset input: the UI's Dataset column and filter were empty for every training
    run, so runs on other data looked alike there. A train run logs its prepare run's input (same digest), once."""
    import mlflow

    from pipeline import config, prepare
    from pipeline.tracking import steps

    cfg = config.load("params/tiny.yaml", ["tracking.experiment=e2e", "data.synthetic_train=40",
                                           "data.synthetic_test=20"])
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("e2e").experiment_id) as run:
        dataset_uri = prepare.run(cfg)
    prepared = mlflow.get_run(run.info.run_id).inputs.dataset_inputs[0].dataset
    with mlflow.start_run(experiment_id=run.info.experiment_id) as train:
        for _ in range(2):  # a resumed run logs it again
            steps.log_dataset_input(dataset_uri, "train")
        steps.log_dataset_input("/nowhere/dataset.npz", "train")  # no prepare run: nothing
    inputs = mlflow.get_run(train.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest, i.dataset.source) for i in inputs] == [
        (prepared.name, prepared.digest, prepared.source)]
    assert prepared.digest == mlflow.get_run(run.info.run_id).data.tags["dataset_sha256"][:32]
    assert {(t.key, t.value) for t in inputs[0].tags} == {("mlflow.data.context", "train")}


def test_a_resumed_runs_wall_s_is_the_time_it_trained_not_the_gap_between_its_sessions(store, in_process, monkeypatch,
                                                                                        tmp_path):
    """A run stopped after an epoch and resumed later keeps its first start time: its wall_s (end - start) counted
    the hours between its sessions, and `--metric wall_s` ranked it as the slowest of runs that trained as long.
    wall_s is the seconds train spent on it, summed over its sessions (metric wall_seconds), rebuild included; a run
    logged before that metric shows its end - start, marked."""
    import signal
    import sqlite3

    import keras
    from mlflow import MlflowClient

    from pipeline import compare, tracking, train

    trained = train.fit

    def stopped_after_an_epoch(model, cfg, splits, num_classes, callbacks):
        class Stop(keras.callbacks.Callback):  # after the epoch's checkpoint: SIGTERM, as a kill of the session
            def on_epoch_end(self, epoch, logs=None):
                raise tracking.Interrupted(signal.SIGTERM)
        return trained(model, cfg, splits, num_classes, [*callbacks, Stop()])

    args = ("train", "--params", "params/tiny.yaml", "--epochs", "2",
            "--overrides", "tracking.experiment=e2e data.synthetic_train=256 data.synthetic_test=64")
    monkeypatch.setattr(train, "fit", stopped_after_an_epoch)
    assert in_process(*args).returncode == 128 + signal.SIGTERM
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    (stopped,) = client.search_runs([experiment], "tags.step = 'train'")
    run_id = stopped.info.run_id
    first_session = stopped.data.metrics.get("wall_seconds", 0.0)  # logged as the stopped session ended
    # resumed an hour later: the same as its first session starting an hour earlier
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("UPDATE runs SET start_time = start_time - 3600000 WHERE run_uuid = ?", (run_id,))
    monkeypatch.setattr(train, "fit", trained)
    resumed = in_process(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming train run {run_id}" in resumed.stdout

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and (run.info.end_time - run.info.start_time) / 1000 > 3600
    epoch_seconds = {m.step: m.value for m in client.get_metric_history(run_id, "epoch_seconds")}
    # an older run, logged before wall_seconds: 3,000 s from start to end (under the hour between the sessions,
    # and over any training of this test's on a loaded machine)
    older = client.create_run(experiment, start_time=1_000, tags={"step": "train"}).info.run_id
    client.log_param(older, "train.epochs", "2")  # a training run logs its params
    client.log_metric(older, "val_acc", 0.5, step=1)
    client.set_terminated(older, end_time=3_001_000)

    result = compare.run("e2e", metric="wall_s")
    table = result["table"].set_index("run_id")
    wall = table.loc[run_id, "wall_s"]
    # both sessions (the second's rebuild and epoch 2 after the first's epoch 1), not the hour between them
    assert first_session + epoch_seconds[2] < wall < 3000
    assert first_session > 0 and wall == run.data.metrics["wall_seconds"]
    assert table.loc[run_id, "wall_s_from"] == "" and table.loc[older, "wall_s_from"] == "end - start"
    assert table.loc[older, "wall_s"] == 3000
    assert result["table"]["run_id"].tolist() == [run_id, older]  # by wall_s: ranked by the hour, it came last
    assert "The wall_s of 1 run (column wall_s_from: `end - start`)" in result["markdown"]


@pytest.mark.parametrize("claimed", [True, False], ids=["its-own", "another-process-trains-it"])
def test_a_session_that_fails_adds_its_seconds_only_to_a_run_it_trains(store, monkeypatch, claimed):
    """A stopped or failed session counts in its run's wall_seconds; one refused because another live process trains
    the run (claim refused) must log nothing there: a point of its own would step past that process's total."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline import config, train
    from pipeline.tracking import resume

    def refused(cfg, dataset_uri, dist, extra_callbacks, clock):
        if claimed:
            assert resume.claim(clock.run_id)
        raise config.ConfigError("resume: run is being trained by another process right now")

    monkeypatch.setattr(train, "train_session", refused)
    experiment = MlflowClient().get_experiment_by_name("e2e").experiment_id
    with mlflow.start_run(experiment_id=experiment) as run:
        MlflowClient().log_metric(run.info.run_id, "wall_seconds", 100.0, step=0)  # an earlier session's
        with pytest.raises(config.ConfigError):
            train.run(config.load("params/tiny.yaml"), "")
        resume.release(run.info.run_id)
    history = MlflowClient().get_metric_history(run.info.run_id, "wall_seconds")
    if claimed:
        assert [m.step for m in history] == [0, 1] and 100 < history[-1].value < 110
    else:
        assert [(m.step, m.value) for m in history] == [(0, 100.0)]


def test_an_experiment_in_mlflows_trash_is_one_line_naming_it(store, in_process, monkeypatch):
    """`experiment=` naming a deleted experiment said it held no finished training runs, as if it were empty; with no
    experiment named, MLflow's default experiment in the trash (where the comparison run goes) was a traceback, exit 1,
    after every run was searched."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from pipeline.tracking import steps

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # as a process of its own: set by an earlier command
    client = MlflowClient()
    binned = client.create_experiment("binned")
    for experiment in (binned, client.get_experiment_by_name("e2e").experiment_id):
        run = client.create_run(experiment, start_time=1_000, tags={"step": "train"}).info.run_id
        client.log_param(run, "train.epochs", "2")  # a training run logs its params
        client.log_metric(run, "val_acc", 0.5, step=1)
        client.set_terminated(run, end_time=2_000)
    client.delete_experiment(binned)
    client.delete_experiment("0")

    def comparisons():
        every = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        return client.search_runs(every, "tags.step = 'compare'", run_view_type=ViewType.ALL)

    named = in_process("compare", "--experiment", "binned")
    assert refusal(named) == (
        f"error: experiment: 'binned' is in MLflow's trash; restore it (mlflow experiments restore --experiment-id "
        f"{binned}) or name another")
    with monkeypatch.context() as patch:  # refused before a run is read: no wait on hundreds of them first
        patch.setattr(steps, "search_train_runs", lambda *args: pytest.fail("searched"))
        unnamed = in_process("compare")
    assert refusal(unnamed) == (
        "error: experiment: none named, so the comparison run goes to MLflow's default experiment 'Default', which is "
        "in MLflow's trash; restore it (mlflow experiments restore --experiment-id 0) or set MLFLOW_EXPERIMENT_NAME "
        "to another")
    assert comparisons() == []
    # as the error says: every experiment's runs compared, the comparison recorded in another experiment
    done = in_process("compare", env={"MLFLOW_EXPERIMENT_NAME": "e2e"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r.info.experiment_id for r in comparisons()] == [client.get_experiment_by_name("e2e").experiment_id]
    # a default experiment that does not exist: one line, exit 2, no comparison run
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    unknown = in_process("compare", env={"MLFLOW_EXPERIMENT_ID": "999"})
    assert refusal(unknown) == (
        "error: experiment: none named, so the comparison run goes to MLflow's default experiment, and "
        "MLFLOW_EXPERIMENT_ID=999 names no experiment; name one (-P experiment=) or set MLFLOW_EXPERIMENT_ID to an "
        "experiment's id")
    assert len(comparisons()) == 1


def test_an_unknown_experiment_name_suggests_the_one_meant(store, in_process):
    """`-P experiment=` given an experiment's id (as `mlflow runs list --experiment-id` takes it) or its name in
    other letter case was only "no experiment named ..."."""
    from mlflow import MlflowClient

    experiment_id = MlflowClient().create_experiment("Seed-Study")
    for given, hint in ((experiment_id, f"; experiment {experiment_id} is 'Seed-Study': give its name"),
                        ("seed-study", "; did you mean 'Seed-Study'?"), ("seed-studdy", "; did you mean 'Seed-Study'?"),
                        ("zzz", "")):
        refused = in_process("compare", "--experiment", given)
        assert refusal(refused) == f"error: experiment: no experiment named {given!r}{hint}"


def test_a_default_experiment_whose_artifact_folder_is_below_a_file_is_one_line_before_the_run(store, tmp_path,
                                                                                                  in_process,
                                                                                                  monkeypatch):
    """With no experiment named, the comparison run goes to MLflow's default experiment (MLFLOW_EXPERIMENT_NAME, else
    `Default`, whose artifacts go to `mlruns/0`): one whose artifact location a file sits in (or above) was a
    NotADirectoryError traceback, exit 1, a FAILED comparison run left holding nothing. Now one line naming the folder,
    exit 2, and no run."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient()
    (tmp_path / "a file").write_text("not a folder")
    blocked = client.create_experiment("blocked", artifact_location=str(tmp_path / "a file" / "artifacts"))
    run = client.create_run(client.get_experiment_by_name("e2e").experiment_id, start_time=1_000,
                            tags={"step": "train"}).info.run_id
    client.log_metric(run, "val_acc", 0.5, step=1)
    client.set_terminated(run, end_time=2_000)
    # named, the comparison run goes there: refused naming the param given, not tracking.experiment
    in_blocked = client.create_run(blocked, start_time=1_000, tags={"step": "train"}).info.run_id
    client.set_terminated(in_blocked, end_time=2_000)
    named = in_process("compare", "--experiment", "blocked")
    assert refusal(named).startswith(
        f"error: experiment: 'blocked' keeps its artifacts in {tmp_path / 'a file' / 'artifacts'}, where this user "
        f"cannot write: {tmp_path / 'a file'} is a file, not a folder; "), named.stderr[-3000:]
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # as a process of its own: set by an earlier command
    refused = in_process("compare", env={"MLFLOW_EXPERIMENT_NAME": "blocked"})
    assert refusal(refused).startswith(
        f"error: experiment: none named, so the comparison run goes to MLflow's default experiment 'blocked', which "
        f"keeps its artifacts in {tmp_path / 'a file' / 'artifacts'}, where this user cannot write: "
        f"{tmp_path / 'a file'} is a file, not a folder; "), refused.stderr[-3000:]
    assert [r.info.run_id for r in client.search_runs([blocked], run_view_type=ViewType.ALL)] == [in_blocked]


def test_a_comparison_whose_reader_stops_reading_is_recorded_finished(store):
    """`mlflow run . -e compare | head`: printing the table into the closed pipe was a BrokenPipeError traceback,
    exit 1, and the comparison run, every artifact logged, ended FAILED with that as its failure_reason."""
    from mlflow import MlflowClient

    from tests.conftest import eventually

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    run = client.create_run(experiment, start_time=1_000, tags={"step": "train"}).info.run_id
    client.log_param(run, "train.epochs", "2")  # a training run logs its params
    client.log_metric(run, "val_acc", 0.5, step=1)
    client.set_terminated(run, end_time=2_000)
    cmd, _ = server_run_command("", "e2e", "compare", {})
    process = subprocess.Popen(cmd, env=store, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader gone before the table is printed, as `| head -0`
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-3000:]

    def comparison():
        (found,) = client.search_runs([experiment], "tags.step = 'compare'")
        return found if found.info.status != "RUNNING" else None

    found = eventually(comparison)
    assert found.info.status == "FINISHED" and "failure_reason" not in found.data.tags
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {
        "runs.md", "runs.csv", "val_acc.png", "compared_runs.txt"}


def test_run_ids_that_cannot_be_compared_are_refused_saying_why(store, in_process):
    """A finished training run named in run_ids but in MLflow's trash (or its experiment) was refused as one of the "not
    finished training runs", as were one still running, one of another step and an id of no run: nothing said which
    was which."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    other = client.create_experiment("other")

    def finished(experiment_id: str, step: str = "train", status: str | None = "FINISHED") -> str:
        run = client.create_run(experiment_id, start_time=1_000, tags={"step": step}).info.run_id
        client.log_param(run, "train.epochs", "2")  # a training run logs its params
        client.log_metric(run, "val_acc", 0.5, step=1)
        if status:
            client.set_terminated(run, status, end_time=2_000)
        return run

    good, binned, running, killed, evaluated, elsewhere = (
        finished(experiment), finished(experiment), finished(experiment, status=None),
        finished(experiment, status="KILLED"), finished(experiment, "evaluate"), finished(other))
    parent = finished(experiment, "main")  # a pipeline's top run, as the UI lists it first: its train run is the one
    client.set_tag(parent, "train_run_id", good)
    gone = client.create_experiment("gone")
    in_gone = finished(gone)
    client.delete_run(binned)
    client.delete_experiment(gone)
    unknown = "0" * 32
    reasons = {binned: f"in MLflow's trash: mlflow runs restore --run-id {binned}",
               in_gone: f"its experiment 'gone' is in MLflow's trash: mlflow experiments restore --experiment-id "
                        f"{gone}",
               running: "RUNNING",
               killed: "KILLED", evaluated: "a run of step 'evaluate'", elsewhere: "of experiment 'other'",
               parent: f"a run of step 'main': give its training run, {good}",
               unknown: "no run of that id"}
    refused = in_process("compare", "--experiment", "e2e", "--run-ids", ",".join([good, *reasons]))
    assert refusal(refused) == "error: run_ids: not finished training runs of e2e: " + ", ".join(
        f"{run_id} ({reasons[run_id]})" for run_id in sorted(reasons))
    # with no experiment named, a run of any experiment is compared, its experiment named
    both = in_process("compare", "--run-ids", f"{good},{elsewhere}")
    assert both.returncode == 0, both.stderr[-3000:]
    assert re.search(r"^\| run +\| run_id +\| experiment +\|", both.stdout, re.M) and "| other " in both.stdout


def test_a_model_evaluated_on_its_dataset_spelled_otherwise_shows_its_test_acc(store, tmp_path, monkeypatch):
    """A model trained on `-P dataset_uri=data/d.npz` and evaluated on `./data/d.npz`, the absolute path or a file://
    URI of the same file (or the other way round) showed no test_acc: an evaluation counted only where its dataset_uri
    was the train run's, character for character. What the file is decides now; an evaluation of other data at the
    same path (the file written again since) still does not count."""
    from types import SimpleNamespace

    import mlflow
    import numpy as np

    from pipeline import compare, config, data, evaluate
    from pipeline.tracking import steps
    from pipeline.tracking.resume import DATASET_SHA256, local_dataset_sha256
    from tests.test_failures import Echo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    dataset = data.make_synthetic(n_train=16, n_test=20)
    dataset.save(tmp_path / "data" / "d.npz")
    absolute = str(tmp_path / "data" / "d.npz")
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=dataset.class_names, tta="none", predict_proba=lambda x, batch_size: np.eye(10)[dataset.y_test]))
    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    uri = (tmp_path / "data" / "d.npz").as_uri()
    spellings = [("data/d.npz", "./data/d.npz"), (absolute, "data/d.npz"), ("./data/d.npz", uri), (uri, absolute)]
    models = []
    for i, (trained_on, evaluated_on) in enumerate(spellings):
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"m{i}", tags={
                "step": "train", "dataset_uri": trained_on, DATASET_SHA256: local_dataset_sha256(trained_on)}):
            mlflow.log_param("train.epochs", "2")  # a training run logs its params
            model = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            model_uri = model.model_uri
            mlflow.set_tag("model_uri", model_uri)
            mlflow.log_metric("val_acc", 0.8, step=1)
        with mlflow.start_run(experiment_id=experiment_id):
            evaluate.run(config.load(TINY), model_uri, evaluated_on)
        models.append(model_uri)
    table = compare.run(experiment="e2e", metric="val_acc")["table"]
    assert table["test_acc"].tolist() == [1.0] * len(spellings), table
    # the file written again with other images: an evaluation of it is no score on the data m0 trained on
    other = data.make_synthetic(n_train=16, n_test=20, seed=1)
    other.save(tmp_path / "data" / "d.npz")
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=other.class_names, tta="none", predict_proba=lambda x, batch_size: np.eye(10)[other.y_test * 0]))
    with mlflow.start_run(experiment_id=experiment_id):
        evaluate.run(config.load(TINY), models[0], "data/d.npz")
    table = compare.run(experiment="e2e", metric="val_acc")["table"]
    assert table.set_index("run").loc["m0", "test_acc"] == 1.0


def test_a_model_trained_on_a_prepare_runs_dataset_and_evaluated_on_a_copy_shows_its_test_acc(store, in_process,
                                                                                                 tmp_path):
    """A model trained on `-P dataset_uri=runs:/<id>/dataset/dataset.npz` and evaluated on a local copy of that file (or
    trained on the copy and evaluated on the `runs:/` URI) showed no test_acc: train and evaluate recorded the file's
    sha256 (tag dataset_sha256) of a local file only, and the two URIs name no one place."""
    import shutil

    from pipeline import compare

    small = "tracking.experiment=e2e data.synthetic_train=256 data.synthetic_test=64"
    prepared = in_process("prepare", "--params", TINY, "--overrides", small)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    artifact = prepared.stdout.splitlines()[-1].removeprefix("dataset_uri=")
    copy = tmp_path / "copy" / "dataset.npz"  # with the dataset.json beside it, as a local dataset file needs
    shutil.copytree(mlflow.artifacts.download_artifacts(artifact.removesuffix("/dataset.npz")), copy.parent)
    for name, trained_on, evaluated_on in (("artifact", artifact, str(copy)), ("copy", str(copy), artifact)):
        trained = in_process("train", "--params", TINY, "--epochs", "1", "--dataset-uri", trained_on,
                             "--overrides", f"{small} train.seed={len(name)}")
        assert trained.returncode == 0, trained.stderr[-3000:]
        model_uri = trained.stdout.splitlines()[-1].removeprefix("logged model ")
        evaluated = in_process("evaluate", "--params", TINY, "--model-uri", model_uri, "--dataset-uri", evaluated_on,
                               "--overrides", small)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    table = compare.run(experiment="e2e", metric="val_acc")["table"]
    assert len(table) == 2 and table["test_acc"].notna().all(), table


def test_a_run_without_a_name_is_its_id_in_the_val_acc_legend(store):
    """A training run with no name (its tag mlflow.runName deleted) had an empty cell in the table, but the legend of
    val_acc.png called it "nan" (or "None"), like a run of that name."""
    import math

    import pandas as pd
    from mlflow import MlflowClient

    from pipeline import compare

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    for start, val_acc in ((1_000, 0.9), (2_000, 0.8)):
        run = client.create_run(experiment, start_time=start, run_name="named", tags={"step": "train"}).info.run_id
        client.log_param(run, "train.epochs", "2")  # a training run logs its params
        client.log_metric(run, "val_acc", val_acc, step=1)
        client.set_terminated(run, end_time=start + 500)
    client.delete_tag(run, "mlflow.runName")
    comparison = compare.run("e2e", metric="val_acc")
    assert pd.isna(comparison["table"]["run"][1])
    histories = {r: compare.val_acc_history(r) for r in comparison["table"]["run_id"]}
    fig = compare.curves_figure(comparison["table"], histories, "val_acc")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        f"named ({comparison['table']['run_id'][0][:7]})", run[:7]]
    table = pd.DataFrame({"run": [None, math.nan], "run_id": ["a" * 32, "b" * 32], "epochs": [0, 1]})
    assert [compare.curve_label(row) for row in table.itertuples()] == ["aaaaaaa (no val_acc)", "bbbbbbb"]


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """The test in `tmp_path`: a store opened after it keeps a new experiment's artifacts in its ./mlruns."""
    monkeypatch.chdir(tmp_path)


def test_a_refused_comparison_makes_no_experiment_of_mlflow_experiment_name(in_tmp_path, store, in_process,
                                                                             monkeypatch):
    """With no experiment named and MLFLOW_EXPERIMENT_NAME naming none yet (a typo, or one meant for later), the check
    of where the comparison run goes made that experiment as it looked it up: a comparison then refused (a run id of no
    run) exited 2 and left an empty experiment of that name behind. It is made only as the comparison run opens."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # as a process of its own: set by an earlier command
    client = MlflowClient()
    run = client.create_run(client.get_experiment_by_name("e2e").experiment_id, start_time=1_000,
                            tags={"step": "train"}).info.run_id
    client.log_param(run, "train.epochs", "2")  # a training run logs its params
    client.log_metric(run, "val_acc", 0.5, step=1)
    client.set_terminated(run, end_time=2_000)
    refused = in_process("compare", "--run-ids", "0" * 32, env={"MLFLOW_EXPERIMENT_NAME": "later"})
    assert refusal(refused) == (
        f"error: run_ids: not finished training runs: {'0' * 32} (no run of that id)")
    assert client.get_experiment_by_name("later") is None
    done = in_process("compare", "--run-ids", run)  # as MLflow does: the experiment is made for the run it records
    assert done.returncode == 0, done.stderr[-3000:]
    later = client.get_experiment_by_name("later")
    assert [r.data.tags["step"] for r in client.search_runs([later.experiment_id])] == ["compare"]


def test_an_empty_mlflow_experiment_name_or_one_the_id_disagrees_with_is_one_line(store, in_process, monkeypatch):
    """With no experiment named, MLFLOW_EXPERIMENT_NAME set but empty (`MLFLOW_EXPERIMENT_NAME=$EXP`, $EXP unset) was
    MLflow's traceback, exit 1 ("Invalid experiment name: ''"), and one naming an experiment whose id is not
    MLFLOW_EXPERIMENT_ID was refused as if MLFLOW_EXPERIMENT_ID named no experiment. Each is one line naming both."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient()
    e2e = client.get_experiment_by_name("e2e").experiment_id
    other = client.create_experiment("other")
    run = client.create_run(e2e, start_time=1_000, tags={"step": "train"}).info.run_id
    client.log_param(run, "train.epochs", "2")  # a training run logs its params
    client.log_metric(run, "val_acc", 0.5, step=1)
    client.set_terminated(run, end_time=2_000)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # as a process of its own: set by an earlier command
    empty = in_process("compare", env={"MLFLOW_EXPERIMENT_NAME": ""})
    assert refusal(empty) == (
        "error: experiment: none named, so the comparison run goes to MLflow's default experiment, and "
        "MLFLOW_EXPERIMENT_NAME is set but empty; name one (-P experiment=), or set MLFLOW_EXPERIMENT_NAME to an "
        "experiment's name or unset it")
    disagree = in_process("compare", env={"MLFLOW_EXPERIMENT_NAME": "e2e", "MLFLOW_EXPERIMENT_ID": other})
    assert refusal(disagree) == (
        f"error: experiment: none named, so the comparison run goes to MLflow's default experiment, and "
        f"MLFLOW_EXPERIMENT_NAME='e2e' (experiment {e2e}) and MLFLOW_EXPERIMENT_ID={other} (experiment 'other') "
        f"disagree; name one (-P experiment=), or unset one of the two")
    every = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    assert client.search_runs(every, "tags.step = 'compare'", run_view_type=ViewType.ALL) == []


def test_a_comparison_whose_files_cannot_be_written_leaves_no_run(store, monkeypatch):
    """The comparison run opened before its files were written: a plot that failed (a full disk, a temporary folder
    gone) left a FAILED comparison run holding no runs.md, runs.csv or plot in the experiment. The files are written
    first; the run opens only to record them."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from pipeline import compare

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    run = client.create_run(experiment, start_time=1_000, tags={"step": "train"}).info.run_id
    client.log_param(run, "train.epochs", "2")  # a training run logs its params
    client.log_metric(run, "val_acc", 0.5, step=1)
    client.set_terminated(run, end_time=2_000)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(compare, "plot_curves", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            compare.run("e2e", metric="val_acc")
    assert client.search_runs([experiment], "tags.step = 'compare'", run_view_type=ViewType.ALL) == []
    done = compare.run("e2e", metric="val_acc")
    assert {a.path for a in client.list_artifacts(done["run_id"])} == {
        "runs.md", "runs.csv", "val_acc.png", "compared_runs.txt"}


def test_the_run_mlflow_run_opened_for_a_resume_is_refused_naming_the_training_run(store, in_process):
    """`mlflow run . -e train -P resume=<id>` prints the id of a run of its own (tag step=resume, `resumes_run`: the
    training run it went on with); given to compare, it was refused as "a run of step 'resume'" alone, where a main
    run's refusal names its training run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    trained = client.create_run(experiment, start_time=1_000, tags={"step": "train"}).info.run_id
    client.log_param(trained, "train.epochs", "2")  # a training run logs its params
    client.log_metric(trained, "val_acc", 0.5, step=1)
    client.set_terminated(trained, end_time=2_000)
    wrapper = client.create_run(experiment, start_time=3_000, tags={"step": "resume", "resumes_run": trained})
    client.set_terminated(wrapper.info.run_id, end_time=4_000)
    refused = in_process("compare", "--run-ids", wrapper.info.run_id)
    assert refusal(refused) == (
        f"error: run_ids: not finished training runs: {wrapper.info.run_id} (a run of step 'resume': give its training "
        f"run, {trained})")


def test_thousands_of_run_ids_are_searched_not_refused_by_mlflows_filter_parser(store, monkeypatch):
    """The run ids went into one `attributes.run_id IN (...)` filter, and MLflow's parser takes at most 10,000 tokens:
    from about 3,300 ids (a sweep's comparison of its trials, a list pasted in) compare died on MLflow's "Error on
    parsing filter" traceback, exit 1. The ids are searched in batches; the table is the same."""
    from mlflow import MlflowClient

    from pipeline import compare, config
    from pipeline.tracking import steps

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    ids = []
    for start, val_acc in ((1_000, 0.5), (2_000, 0.7), (3_000, 0.6)):
        run = client.create_run(experiment, start_time=start, tags={"step": "train"}).info.run_id
        client.log_param(run, "train.lr", str(val_acc))  # a training run logs its params
        client.log_metric(run, "val_acc", val_acc, step=1)
        client.set_terminated(run, end_time=start + 500)
        ids.append(run)
    unknown = [f"{i:032x}" for i in range(3_400)]
    with pytest.raises(config.ConfigError, match=rf"^run_ids: not finished training runs: {unknown[0]} \(no run of "
                                                 rf"that id\), {unknown[1]} \(no run of that id\), .*, and 3390 more$"):
        compare.run(run_ids=[ids[0], *unknown], metric="val_acc")
    monkeypatch.setattr(steps, "RUN_IDS_PER_SEARCH", 2)  # three runs over two searches, as thousands over several
    table = compare.run("e2e", run_ids=ids, metric="val_acc")["table"]
    assert table["run_id"].tolist() == [ids[1], ids[2], ids[0]] and table["train.lr"].tolist() == ["0.7", "0.6", "0.5"]
    given = compare.run(run_ids=[ids[2], ids[0], ids[1]], metric="epochs", in_given_order=True)["table"]
    assert given["run_id"].tolist() == [ids[2], ids[0], ids[1]]


def test_a_refusal_of_many_run_ids_names_ten_and_counts_the_rest(store, in_process):
    """run_ids from another store (a list kept from the team server, compared against a local mlflow.db) were refused
    in one line naming every id with its reason: thousands of ids, a line of hundreds of kilobytes, and a lookup of
    each on the server first. The line names the first ten and counts the others."""
    unknown = [f"{i:032x}" for i in range(25)]
    refused = in_process("compare", "--run-ids", ",".join(reversed(unknown)))
    assert refusal(refused) == (
        "error: run_ids: not finished training runs: " + ", ".join(f"{r} (no run of that id)" for r in unknown[:10])
        + ", and 15 more")


def refusal(done) -> str:
    """The one line a command refused with (exit 2, no traceback): the last of its stderr."""
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]
