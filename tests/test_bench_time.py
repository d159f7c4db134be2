"""bench.time_to_accuracy: a command's wall time split into phases that follow one another and add up."""

from __future__ import annotations

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


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "0,x"], "--seeds: comma-separated integers, got '0,x'"),
    (["--seeds", "0", "--extra", "-P overrides=train.lr=0.1"], "--seeds sets -P overrides=train.seed=S"),
    (["--repeat", "0"], "--repeat: must be >= 1, got 0"),
])
def test_bad_arguments_exit_2_naming_the_option_before_any_run(args, message):
    proc = subprocess.run([sys.executable, "-m", "bench.time_to_accuracy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
