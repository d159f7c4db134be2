"""bench.time_to_accuracy: a command's wall time split into phases that follow one another and add up. And the
training and serving benchmarks' bad input: one line and a non-zero exit, before any measuring where it can be
told then, and never a results file from a benchmark that did not finish (or one marked as such)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.time_to_accuracy import ROOT, phases


def test_phases_follow_the_step_runs_and_add_up_to_the_wall_time():
    spans = {"prepare": (20.0, 40.0), "train": (40.5, 640.5), "evaluate": (641.0, 658.0), "register": (658.0, 659.0)}
    got = phases(662.0, spans, epoch_seconds=590.0)
    assert got == {"start_s": 20.0, "prepare_s": 20.0, "train_epochs_s": 590.0, "train_other_s": 10.0,
                   "evaluate_s": 17.0, "register_s": 1.0, "between_steps_s": 1.0, "exit_s": 3.0}
    assert sum(got.values()) == pytest.approx(662.0)


def test_a_reused_prepare_run_counts_zero_and_the_start_runs_to_train():
    spans = {"train": (15.0, 115.0), "evaluate": (115.0, 130.0), "register": (130.0, 131.0)}
    got = phases(132.0, spans, epoch_seconds=95.0)
    assert (got["start_s"], got["prepare_s"], got["train_other_s"], got["exit_s"]) == (15.0, 0.0, 5.0, 1.0)
    assert sum(got.values()) == pytest.approx(132.0)


def test_phases_rounded_to_tenths_still_add_up_to_the_rounded_wall_time():
    """Each phase was rounded on its own: a run's phases summed to 9.8 s of a 10.0 s wall_s."""
    spans = {"prepare": (0.04, 1.08), "train": (1.14, 7.26), "evaluate": (7.34, 8.46), "register": (8.54, 8.66)}
    got = phases(10.0, spans, epoch_seconds=3.04)
    assert sum(got.values()) == pytest.approx(10.0, abs=1e-9)
    assert all(value == round(value, 1) for value in got.values())
    assert got["train_epochs_s"] == pytest.approx(3.0) and got["exit_s"] == pytest.approx(1.3)


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "0,x"], "--seeds: comma-separated integers, got '0,x'"),
    (["--seeds", "0", "--extra", "-P overrides=train.lr=0.1"], "--seeds sets -P overrides=train.seed=S"),
    (["--repeat", "0"], "--repeat: must be >= 1, got 0"),
    # was refused by each run's `mlflow run`, exit 1, after the runs of the seeds before it
    (["--profiles", "tiny", "--seeds", "0,-1"], "--seeds: train.seed: must be in [0, 2**32), got -1"),
    (["--profiles", "nosuch"], "--profiles: no params/<name>.yaml for 'nosuch'"),
    # was found by the first run's prepare step, after `mlflow run` had started: exit 1 some 30 s in
    (["--profiles", "tiny", "--data", "nosuch/cifar10.tar.gz"],
     "--data: 'nosuch/cifar10.tar.gz' is neither 'cifar10', 'synthetic' nor an existing path"),
    (["--name", "../README"], "--name: a file name without folder or extension, got '../README'"),
    (["--name", "recheck.md"], "--name: a file name without folder or extension, got 'recheck.md'"),
    (["--extra", "-P overrides='train.lr=0.1"], "--extra: No closing quotation in \"-P overrides='train.lr=0.1\""),
    # another entry point or experiment left no train/main run to read back: an unpack ValueError after the run
    (["--extra", "-e train"], "--extra: -e is not for this benchmark"),
    (["--extra", "-P epochs=2 -etrain"], "--extra: -e is not for this benchmark"),
    (["--extra=--entry-point=train"], "--extra: --entry-point is not for this benchmark"),
    (["--extra=--experiment-name x"], "--extra: --experiment-name is not for this benchmark"),
    (["--extra=--experiment-id=0"], "--extra: --experiment-id is not for this benchmark"),
])
def test_bad_arguments_exit_2_naming_the_option_before_any_run(args, message):
    proc = subprocess.run([sys.executable, "-m", "bench.time_to_accuracy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr


def never(*args, **kwargs):
    pytest.fail("measured despite a results folder it cannot write")


# (module, its measuring function, its arguments): each benchmark that writes bench/results (gpu_report: --results)
BENCHMARKS = [("time_to_accuracy", "run_profile", ["--profiles", "tiny"]),
              ("bench_serve", "bench_model", ["--params", "params/tiny.yaml"]), ("sweep", "run_sweep", []),
              ("benchmark", "load_images", []), ("gpu_report", "report", ["--results", "{results}"]),
              ("cpu_runtime", "child_result", []), ("feed", "child_result", []), ("step_exit", "run_child", []),
              ("step_graph", "trace_at", [".", "."]),
              ("multi_gpu", "run_arm", ["--virtual-cpus", "2", "--results", "{results}"])]


@pytest.mark.parametrize(("module", "measure", "args"), BENCHMARKS, ids=[b[0] for b in BENCHMARKS])
def test_a_results_folder_that_cannot_be_written_is_one_line_before_any_measuring(module, measure, args, tmp_path,
                                                                                  monkeypatch, capsys):
    """bench/results not to be written (a read-only checkout; here a file in its place, which stops root too): each
    benchmark measured for minutes, then failed on the report's PermissionError traceback, the numbers lost. One
    line, exit 2, before anything is measured."""
    import importlib

    bench = importlib.import_module(f"bench.{module}")
    (tmp_path / "file").write_text("")
    results = tmp_path / "file" / "results"
    if hasattr(bench, "RESULTS"):
        monkeypatch.setattr(bench, "RESULTS", results)
    monkeypatch.setattr(bench, measure, never)
    monkeypatch.setattr(sys, "argv", [module, *(a.format(results=results) for a in args)])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"error: cannot write the results folder {results}: Not a directory\n"


def test_a_report_whose_writing_fails_leaves_the_one_before_whole(tmp_path):
    """save_results (cpu_runtime, feed, step_exit, multi_gpu) wrote its JSON and Markdown in place: a write that
    failed part way (a full disk, Ctrl-C) left a file cut short where the report was."""
    from bench.machine import save_results

    (tmp_path / "step_exit.md").write_text("the report before\n")

    def write_markdown(results, path):
        path.write_text("| half a ta")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_results(tmp_path, "step_exit", {"rows": []}, write_markdown)
    assert (tmp_path / "step_exit.md").read_text() == "the report before\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_exit.json", "step_exit.md"]  # no partial file left


def test_extra_arguments_reach_mlflow_run_split_as_a_shell_splits_them(monkeypatch):
    """`--extra '-P overrides="a=1 b=2"'` was split at every space: `mlflow run` got overrides='"a=1' and 'b=2"'."""
    from bench import time_to_accuracy

    seen = []

    def run_profile(profile, data, extra, seed=None):
        seen.append(extra)
        raise SystemExit("stop")

    monkeypatch.setattr(time_to_accuracy, "run_profile", run_profile)
    monkeypatch.setattr(sys, "argv", ["time_to_accuracy", "--profiles", "tiny", "--extra",
                                      '-P epochs=2 -P overrides="train.lr=0.1 train.nesterov=false"'])
    with pytest.raises(SystemExit, match="^stop; no results written$"):
        time_to_accuracy.main()
    assert seen == [["-P", "epochs=2", "-P", "overrides=train.lr=0.1 train.nesterov=false"]]


def test_an_option_value_that_looks_like_a_refused_option_is_no_option():
    from bench.time_to_accuracy import refused_extra

    assert refused_extra(["-P", "overrides=-e", "-P", "-e"]) is None
    assert refused_extra(["--env-manager", "local"]) is None


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_finished_runs_report_marked_incomplete(tmp_path, monkeypatch,
                                                                                          capsys):
    """Ctrl-C during a run ended the benchmark with a KeyboardInterrupt traceback."""
    from bench import time_to_accuracy

    runs = iter([fake_run("tiny", 0.5)])

    def run_profile(profile, data, extra, seed=None):
        try:
            return next(runs)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr(time_to_accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(time_to_accuracy, "run_profile", run_profile)
    monkeypatch.setattr(sys, "argv", ["time_to_accuracy", "--profiles", "tiny", "--repeat", "3"])
    with pytest.raises(SystemExit) as exc:
        time_to_accuracy.main()
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert err == (f"interrupted during run 2 of 3 (tiny); {tmp_path / 'time_to_accuracy.md'} holds the 1 earlier "
                   f"run(s), marked incomplete\n")
    assert "**Incomplete: 1 of the command's 3 runs finished**" in (tmp_path / "time_to_accuracy.md").read_text()
    runs = iter([])  # interrupted in the first run: nothing written
    with pytest.raises(SystemExit) as exc:
        time_to_accuracy.main()
    assert exc.value.code == 130 and capsys.readouterr().err.endswith("(tiny); no results written\n")


def test_a_failed_run_is_named_with_its_reason_in_the_report_it_leaves(tmp_path, monkeypatch):
    """The report a failed run left said only `the benchmark was interrupted or a run failed`: not which run, nor why
    (that went to the terminal alone), so the report read the same as one cut short by Ctrl-C."""
    from bench import time_to_accuracy

    runs = iter([fake_run("tiny", 0.5)])

    def run_profile(profile, data, extra, seed=None):
        try:
            return next(runs)
        except StopIteration:
            raise SystemExit("tiny: `mlflow run` failed (exit 1): error: boom") from None

    monkeypatch.setattr(time_to_accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(time_to_accuracy, "run_profile", run_profile)
    monkeypatch.setattr(sys, "argv", ["time_to_accuracy", "--profiles", "tiny", "--seeds", "0,1,2"])
    with pytest.raises(SystemExit, match="error: boom"):
        time_to_accuracy.main()
    text = (tmp_path / "time_to_accuracy.md").read_text()
    assert ("**Incomplete: 1 of the command's 3 runs finished**: run 2 of 3 (tiny, seed 1) failed: tiny: `mlflow run` "
            "failed (exit 1): error: boom. The medians are of the runs that finished") in text
    assert "| runs |" in " ".join(text.split()) and "|      1 |" in text  # the median says how many runs it is of


def fake_run(profile: str, test_acc: float) -> dict:
    row = {"profile": profile, "model": "m", "seed": 0, "epochs": 2, "wall_s": 10.0, "test_acc": test_acc}
    phases_ = {"profile": profile, "wall_s": 10.0, "start_s": 2.0, "train_epochs_s": 8.0}
    return {"row": row, "curve": [(5.0, 0.4), (9.0, 0.6)], "phases": phases_}


def test_a_report_written_before_the_last_run_says_it_is_incomplete(tmp_path, monkeypatch):
    import argparse

    from bench import time_to_accuracy

    monkeypatch.setattr(time_to_accuracy, "RESULTS", tmp_path)
    args = argparse.Namespace(profiles="tiny", repeat=3, seeds="", data="", extra="-P epochs=2")
    time_to_accuracy.write_report([fake_run("tiny", 0.5)], args, 3)
    text = (tmp_path / "time_to_accuracy.md").read_text()
    assert text.startswith("# Time to accuracy (incomplete)")
    assert "**Incomplete: 1 of the command's 3 runs finished**" in text
    assert "--extra '-P epochs=2'" in text  # the command as it ran
    # written after each run, it is read while the benchmark still runs: it did not say a run failed then
    assert "**Incomplete: 1 of the command's 3 runs finished** (the benchmark was still running, or was interrupted" \
           in text
    time_to_accuracy.write_report([fake_run("tiny", 0.5)] * 3, args, 3)
    assert "ncomplete" not in (tmp_path / "time_to_accuracy.md").read_text()


def test_the_report_says_its_threshold_times_run_from_the_commands_start(tmp_path, monkeypatch):
    """`val_acc>=x_s` was `wall seconds when val_acc first reached x`: from the command's start, or training's?"""
    import argparse

    from bench import time_to_accuracy

    monkeypatch.setattr(time_to_accuracy, "RESULTS", tmp_path)
    args = argparse.Namespace(profiles="tiny", repeat=1, seeds="", data="", extra="")
    time_to_accuracy.write_report([fake_run("tiny", 0.5)], args)
    text = " ".join((tmp_path / "time_to_accuracy.md").read_text().split())
    assert ("`val_acc>=x_s`: seconds from the command's start (prepare included) to the logging of the first "
            "epoch's val_acc that reached x; blank where none did") in text


def test_a_report_interrupted_while_it_is_rewritten_stays_the_one_before(tmp_path, monkeypatch):
    import argparse
    import pathlib

    from bench import time_to_accuracy

    monkeypatch.setattr(time_to_accuracy, "RESULTS", tmp_path)
    args = argparse.Namespace(profiles="tiny", repeat=2, seeds="", data="", extra="")
    time_to_accuracy.write_report([fake_run("tiny", 0.5)], args, 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_text = pathlib.Path.write_text

    def cut_short(path, text, *a, **k):  # Ctrl-C halfway through the file
        write_text(path, text[:len(text) // 2], *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", cut_short)
    with pytest.raises(KeyboardInterrupt):
        time_to_accuracy.write_report([fake_run("tiny", 0.5), fake_run("tiny", 0.6)], args, 2)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after["time_to_accuracy.md"] == before["time_to_accuracy.md"]  # the whole report of the first run
    assert sorted(after) == ["time_to_accuracy.md", "time_to_accuracy.png"]  # nothing staged is left


def test_a_named_report_leaves_the_default_one_as_it_is(tmp_path, monkeypatch):
    import argparse

    from bench import time_to_accuracy

    monkeypatch.setattr(time_to_accuracy, "RESULTS", tmp_path)
    args = argparse.Namespace(profiles="tiny", repeat=1, seeds="", data="", extra="", name="recheck")
    time_to_accuracy.write_report([fake_run("tiny", 0.5)], args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recheck.md", "recheck.png"]
    text = (tmp_path / "recheck.md").read_text()
    assert "--name recheck`" in text and "](recheck.png)" in text


def test_a_failed_run_is_one_line_naming_its_error(monkeypatch):
    from bench import time_to_accuracy

    stderr = ("INFO creating tables\nerror: params: file not found: params/x.yaml\n"
              "ERROR mlflow.cli: === Run failed ===\n")
    monkeypatch.setattr(time_to_accuracy.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, stdout="", stderr=stderr))
    with pytest.raises(SystemExit) as exc:
        time_to_accuracy.run_profile("x", "", [])
    assert str(exc.value) == "x: `mlflow run` failed (exit 1): error: params: file not found: params/x.yaml"


def test_every_run_compiles_afresh_in_a_jax_compilation_cache_of_its_own(monkeypatch):
    """`pipeline` (imported by `bench`) points JAX's compilation cache at ~/.cache for this process and its children:
    each run of the benchmark would load what the one before it compiled, its clock not starting from nothing."""
    import mlflow  # noqa: F401 - imported before subprocess.run is replaced (run_profile imports it)

    from bench import time_to_accuracy

    folders = []

    def run(cmd, env, **_):
        folders.append(env["JAX_COMPILATION_CACHE_DIR"])
        assert not os.path.exists(env["JAX_COMPILATION_CACHE_DIR"])
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="error: stop here\n")

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/cifar10-resnet/jax"))
    monkeypatch.setattr(time_to_accuracy.subprocess, "run", run)
    for _ in range(2):
        with pytest.raises(SystemExit, match="error: stop here"):
            time_to_accuracy.run_profile("quick", "", [])
    assert len(set(folders)) == 2 and not any(folder.startswith(os.path.expanduser("~")) for folder in folders)


def test_a_failed_child_of_a_benchmark_is_one_line_with_its_reason():
    from bench.machine import child_result

    with pytest.raises(SystemExit) as exc:  # the child's own argument check fails: exit 2
        child_result("bench.feed", "--child", "keras", "--images", "10", timeout=300)
    message = str(exc.value)
    assert "\n" not in message and "python -m bench.feed --child keras --images 10` failed (exit 2)" in message
    assert "--images >= 256" in message and message.endswith("no results written")


def test_sweep_benchmark_refuses_zero_epochs_before_any_sweep():
    proc = subprocess.run([sys.executable, "-m", "bench.sweep", "--epochs", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--epochs: must be >= 1, got 0" in proc.stderr


def test_sweep_benchmark_failed_command_is_one_line():
    from bench import sweep

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback\n  ...\nerror: trial 0: bad\n")
    with pytest.raises(SystemExit, match=r"^pipeline.sweep failed \(exit 1\): error: trial 0: bad; no results"):
        sweep.check(failed, "pipeline.sweep")


def test_sweep_benchmark_whose_sweep_failed_a_trial_is_one_line_not_a_wall_time(tmp_path, monkeypatch):
    """`pipeline.sweep` goes on past a failed trial and exits 0: the benchmark read the failed trial's runs (a KeyError
    on its missing train_run_id tag), where it should say the sweep measured is not that of its 8 trials."""
    from types import SimpleNamespace

    import optuna

    from bench import sweep

    study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.CategoricalDistribution(sweep.LRS)
    for number, state in enumerate([optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                    optuna.trial.TrialState.COMPLETE]):
        attrs = {"mlflow_run_id": f"trial{number}",
                 **({"failure_reason": "ValueError: out of memory"} if state.name == "FAIL" else {})}
        study.add_trial(optuna.trial.create_trial(params={"train.lr": sweep.LRS[number]},
                                                  distributions={"train.lr": lr},
                                                  value=0.5 + number / 10 if state.name == "COMPLETE" else None,
                                                  state=state, user_attrs=attrs))

    class Client:  # what MLflow holds of each trial: a finished one's train run and its val_acc points
        def __init__(self, uri):
            pass

        def get_run(self, run_id):
            tags = {} if run_id == "trial1" else {"train_run_id": f"train-{run_id}"}
            return SimpleNamespace(data=SimpleNamespace(tags=tags))

        def get_metric_history(self, run_id, key):
            return [0.5, 0.6, 0.7]

    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 0, "", ""))
    monkeypatch.setattr(sweep.optuna, "load_study", lambda **k: study)
    monkeypatch.setattr(sweep, "MlflowClient", Client)
    with pytest.raises(SystemExit) as exc:
        sweep.run_sweep(tmp_path / "0", "none", 1, 3)
    assert str(exc.value) == ("pipeline.sweep (none pruning, 1 worker): trial 1 FAIL: ValueError: out of memory; "
                              "no results written")
    # a sweep whose trials all ended: its epochs, trials and best counted
    ok = optuna.create_study(direction="maximize")
    for trial in study.trials:
        if trial.state.name == "COMPLETE":
            ok.add_trial(trial)
    monkeypatch.setattr(sweep.optuna, "load_study", lambda **k: ok)
    result = sweep.run_sweep(tmp_path / "1", "none", 1, 3)
    assert (result["epochs"], result["trials"], result["states"], result["best_val_acc"]) == (6, 2, {"COMPLETE": 2},
                                                                                             0.7)
    assert result["best_lr"] == sweep.LRS[2] and result["wall_s"] >= 0


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-requests", "0"], "--batch-requests: must be >= 1, got 0"),
    (["--latency-requests", "0"], "--latency-requests: must be >= 1, got 0"),
    (["--json-batch-requests", "-1"], "--json-batch-requests: must be >= 1, got -1"),
    (["--params", "nosuch.yaml"], "--params: params: file not found: nosuch.yaml"),
    (["--params", "params/tiny.yaml", "./params/tiny.yaml"], "--params: ./params/tiny.yaml given twice"),
])
def test_serving_benchmark_refuses_bad_arguments_before_serving(args, message, tmp_path, monkeypatch, capsys):
    from bench import bench_serve

    monkeypatch.setattr(bench_serve, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_serve, "bench_model", lambda *a: pytest.fail("measured despite bad arguments"))
    with pytest.raises(SystemExit) as exc:
        bench_serve.main(["--params", "params/tiny.yaml", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_serving_benchmark_whose_server_fails_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from bench import bench_serve

    def server_dies(params, tmp, args):
        raise RuntimeError("server exited with 1:\nTraceback ...\nModuleNotFoundError: no module named x")

    monkeypatch.setattr(bench_serve, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench_serve, "bench_model", server_dies)
    monkeypatch.setattr(bench_serve.mlflow, "set_tracking_uri", lambda uri: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")  # restored after the test
    with pytest.raises(SystemExit) as exc:
        bench_serve.main(["--params", "params/tiny.yaml"])
    assert str(exc.value) == ("params/tiny.yaml: server exited with 1: ... ModuleNotFoundError: no module named x; "
                              "no results written")
    assert not (tmp_path / "results").exists()


def test_serving_benchmark_logs_two_params_files_of_one_name_each_as_its_own(store, tmp_path):
    """Each model went into an experiment named after its file's stem: a second `tiny.yaml` (another folder) was
    MLflow's traceback of a name already taken, after the first model's minutes of measuring."""
    import shutil

    from bench import bench_serve

    other = tmp_path / "other" / "tiny.yaml"
    other.parent.mkdir()
    shutil.copyfile(ROOT / "params" / "tiny.yaml", other)
    uris = [bench_serve.log_untrained_model(params, tmp_path) for params in ("params/tiny.yaml", str(other))]
    assert len(set(uris)) == 2 and all(uri.startswith("models:/m-") for uri in uris)


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--fit-feeds", "0"], "--fit-feeds: must be >= 1 images, got 0"),  # was the whole benchmark, minutes of it
])
def test_training_benchmark_refuses_bad_arguments(args, message, capsys):
    from bench import benchmark

    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_training_benchmark_rows_state_their_own_speed_up(tmp_path):
    from bench import benchmark

    feeds = {f"{feed}_steps_per_execution_{n}": 1000 for feed in ("host", "device") for n in (1, 16)}
    results = {"machine": "m", "keras": "3", "backend": "tensorflow", "date": "d", "data": "synthetic", "gpu": "-",
               "input_pipeline": {"seed_image_data_generator": 1000, "fit_feed_steps_per_execution_1": 40000,
                                  "fit_feed_steps_per_execution_16": 30000, "augment_kernel": 100000,
                                  "speedup_fit_feed": 40.0, "speedup_kernel": 100.0, "needed_for_6s_epoch": 8333},
               "input_pipeline_jax": feeds, "train_step": {},
               "tracking": {"epoch_seconds_logging_on": 1.0, "epoch_seconds_logging_off": 1.0,
                            "measured_overhead_percent": 0.0, "log_call_ms_per_epoch": 1.0,
                            "log_call_share_of_epoch_percent": 0.1, "images_per_epoch": 5000}}
    benchmark.write_markdown(results, tmp_path / "benchmark.md")
    row = next(line for line in (tmp_path / "benchmark.md").read_text().splitlines()
               if line.startswith("| the same, steps_per_execution 16"))
    assert "30,000" in row and "**30x**" in row  # steps_per_execution 1's 40x is not this row's


def test_step_exit_child_that_fails_is_one_line(monkeypatch):
    from bench import step_exit

    monkeypatch.setattr(step_exit, "ARGS", ["--params", "nosuch.yaml"])
    with pytest.raises(SystemExit) as exc:
        step_exit.run_child("freeze")
    message = str(exc.value)
    assert "\n" not in message and message.startswith("freeze: `python -m pipeline.main` failed (exit 2)")
    assert "nosuch.yaml" in message


def test_cpu_runtime_refuses_a_side_repeated_as_its_own_baseline(tmp_path, monkeypatch, capsys):
    from bench import cpu_runtime

    monkeypatch.setattr(cpu_runtime, "RESULTS", tmp_path)
    monkeypatch.setattr(cpu_runtime, "run_child", lambda *a: pytest.fail("measured despite bad arguments"))
    monkeypatch.setattr(sys, "argv", ["cpu_runtime", "--sides", "bfc,bfc"])
    with pytest.raises(SystemExit) as exc:
        cpu_runtime.main()
    assert exc.value.code == 2 and "--sides: two or more different ones of" in capsys.readouterr().err


def test_cpu_runtime_times_the_same_float32_xla_step_on_every_side(monkeypatch):
    # quick.yaml's `auto` is probed per machine on TensorFlow only: on a bfloat16 CPU the TensorFlow sides timed a
    # step without XLA (XNNPACK, XLA's, then changes nothing) and the JAX side one with it, under one header
    from bench import cpu_runtime
    from pipeline import config

    train = config.load(cpu_runtime.PROFILE, cpu_runtime.OVERRIDES).train
    assert (train.precision, train.jit_compile) == ("float32", True)
    env = cpu_runtime.SIDES["bfc"][1]
    child = {"env": env, "backend": "tensorflow", "dtype_policy": "mixed_bfloat16", "jit_compile": False}
    monkeypatch.setattr(cpu_runtime, "child_result", lambda *a, **k: child)
    with pytest.raises(SystemExit) as exc:
        cpu_runtime.run_child("bfc", 2)
    assert "\n" not in str(exc.value) and "bfc: the child timed a mixed_bfloat16 step" in str(exc.value)
    monkeypatch.setattr(cpu_runtime, "child_result", lambda *a, **k: {**child, "dtype_policy": "float32",
                                                                       "jit_compile": True})
    assert cpu_runtime.run_child("bfc", 2)["jit_compile"] is True


def test_feed_benchmark_sides_train_as_many_images_per_epoch():
    # the pipeline's feed drops the partial batch under quick.yaml's train.drop_remainder; Keras's array feed
    # always trains it (one more step, and a second compile for its shape) unless given whole batches
    import numpy as np

    from bench import feed
    from pipeline import config, fitting

    cfg = config.load(feed.PROFILE)
    assert cfg.train.drop_remainder
    splits = (np.zeros((10035, 1), np.uint8), np.zeros(10035, np.int32), np.zeros((205, 1), np.uint8),
              np.zeros(205, np.int32))
    x_train, y_train, x_val, _ = feed.keras_splits(cfg, splits)
    steps = fitting.steps_per_epoch(cfg.train, len(splits[0]))
    assert len(x_train) == len(y_train) == steps * cfg.train.batch_size == 9984 and len(x_val) == 205


def test_serving_benchmark_names_resnet9_without_the_preact_fields_it_ignores():
    from bench.bench_serve import describe_model
    from pipeline import config

    assert describe_model(config.load("params/quick.yaml").model) == "ResNet-9 (widths [16, 48, 192, 384])"
    assert describe_model(config.load("params/tiny.yaml").model).startswith("ResNet-11 (bottleneck, widths")


def test_a_run_read_back_times_each_threshold_by_its_epoch_and_names_its_validation_split(monkeypatch):
    """The report said val_acc came from a held-out split even for a profile that validates on the test split."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from bench import time_to_accuracy

    def command(cmd, env, **kwargs):  # what `mlflow run` of main leaves in the fresh store, in seconds from its start
        # run_profile reads its clock just before this call: a clock read before run_profile is further off by
        # whatever a loaded machine pauses this test for in between, than the 0.2 s the times below allow
        started = time.time()
        client, now = MlflowClient(env["MLFLOW_TRACKING_URI"]), int(started * 1000)
        experiment = client.create_experiment("x", artifact_location=env["PIPELINE_CHECKPOINT_DIR"])
        runs = {}
        for step, begin, end in (("main", 1, 9), ("prepare", 2, 3), ("train", 3, 7), ("evaluate", 7, 8),
                                 ("register", 8, 8.5)):
            runs[step] = client.create_run(experiment, start_time=now + int(begin * 1000), tags={"step": step},
                                           run_name="resnet11-e3" if step == "train" else step).info.run_id
            client.set_terminated(runs[step], end_time=now + int(end * 1000))
        client.log_param(runs["train"], "train.seed", "0")
        client.log_param(runs["train"], "train.validation_fraction", "0.0")
        client.log_batch(runs["train"], metrics=[Metric("val_acc", v, now + int(t * 1000), epoch) for epoch, (t, v)
                                                 in enumerate([(4, 0.45), (5, 0.72), (6, 0.71)], start=1)]
                         + [Metric("epoch_seconds", 1.0, now, epoch) for epoch in (1, 2, 3)])
        client.log_metric(runs["main"], "test_acc", 0.7)
        time.sleep(max(0.0, started + 0.5 - time.time()))  # registered 0.5 s (or more) into the command
        client.create_registered_model("cifar10-resnet")
        version = client.create_model_version("cifar10-resnet", f"{env['PIPELINE_CHECKPOINT_DIR']}/model")
        client.set_tag(runs["main"], "registered_version", version.version)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(time_to_accuracy.subprocess, "run", command)
    result = time_to_accuracy.run_profile("tiny", "", [])
    row = result["row"]
    assert (row["epochs"], row["val_split"], row["best_val_acc"]) == (3, "test split", 0.72)
    assert row["val_acc>=0.5_s"] == row["val_acc>=0.7_s"] == pytest.approx(5.0, abs=0.2)  # epoch 2, not 1 or 3
    assert row["val_acc>=0.8_s"] is None and row["val_acc>=0.9_s"] is None
    # the registered model's time is the version's creation in the registry, not the command's exit
    assert row["registered_version"] == "1" and 0.5 <= row["registered_s"] <= row["wall_s"]
    assert result["phases"]["train_epochs_s"] == 3.0
    assert result["phases"]["train_other_s"] == pytest.approx(1.0, abs=0.1)


def test_benchmark_reports_name_the_cpus_family_model_and_bfloat16_units():
    # a VM's "model name" is often just "AMD EPYC", while the CPU speeds measured depend on its generation
    import os

    from bench.machine import describe_cpu, machine

    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
               "model name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\ncpu family\t: 26\n")
    assert describe_cpu(cpuinfo) == "AMD EPYC (family 25, model 17; AVX512-BF16)"
    assert describe_cpu(cpuinfo.replace(" avx512_bf16", "")) == "AMD EPYC (family 25, model 17; no bfloat16 units)"
    assert describe_cpu("") is None and f"{os.cpu_count()}-core " in machine()


@pytest.mark.parametrize("said", ["No devices were found", "NVIDIA-SMI has failed because it couldn't communicate "
                                                           "with the NVIDIA driver."])
def test_a_failing_nvidia_smi_names_no_gpu(tmp_path, monkeypatch, said):
    """nvidia-smi installed but without a GPU or its driver prints why on stdout and exits non-zero: the reports
    named the machine `GPU: No devices were found`."""
    from bench.machine import gpu_names, machine

    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho \"{said}\"\necho\nexit 6\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpu_names() == [] and machine().endswith(", no GPU")
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3'\necho 'NVIDIA H100 80GB HBM3'\n")
    assert gpu_names() == ["NVIDIA H100 80GB HBM3"] * 2


def test_a_threshold_never_reached_and_a_time_not_read_back_are_blank_never_nan_nor_a_median_of_fewer(
        tmp_path, monkeypatch):
    """A run whose val_acc never reached 0.9 showed `nan` in the table; a run without registered_s left the median
    of the others as the profile's median over both runs."""
    import argparse

    from bench import time_to_accuracy

    monkeypatch.setattr(time_to_accuracy, "RESULTS", tmp_path)
    runs = [fake_run("tiny", 0.5), fake_run("tiny", 0.6)]
    for run, reached, registered in zip(runs, (None, 9.0), (None, 8.0), strict=True):
        run["row"] = {**run["row"], "val_acc>=0.9_s": reached, "registered_s": registered}
    args = argparse.Namespace(profiles="tiny", repeat=2, seeds="", data="", extra="")
    time_to_accuracy.write_report(runs, args, 2)
    text = (tmp_path / "time_to_accuracy.md").read_text()
    assert "nan" not in text
    tables = [[[cell.strip() for cell in line.strip("|").split("|")] for line in block.splitlines()
               if line.startswith("|")] for block in text.split("\n\n") if block.startswith("|")]
    medians, every = ({name: [row[i] for row in table[2:]] for i, name in enumerate(table[0])} for table in tables[:2])
    assert medians["registered_s"] == [""] and medians["wall_s"] == ["10"]  # of one run of two: no median
    assert every["val_acc>=0.9_s"] == ["", "9"] and every["registered_s"] == ["", "8"]
