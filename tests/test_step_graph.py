"""bench.step_graph: the same code traces the same train step, node for node, in separate processes and from a tree
read out of git; another model is told apart, by its op counts or by the nodes that differ; bad input is one line and
a non-zero exit, with no report written."""

from __future__ import annotations

import re
import shlex

import pytest

from bench import step_graph

TINY = "params/tiny.yaml"


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(step_graph, "RESULTS", tmp_path)
    return tmp_path


def test_a_commit_and_its_own_tree_trace_the_same_step(results):
    step_graph.main(["HEAD", "HEAD", "--params", TINY, "--overrides", "", "--name", "same"])
    report = (results / "same.md").read_text()
    first, second = ([cell.strip() for cell in line.split("|")] for line in report.splitlines()
                     if line.startswith("| HEAD"))
    assert (first[-2], second[-2]) == ("baseline", "**identical**"), report
    assert first[3] == second[3]  # one digest


def test_another_width_differs_in_nodes_and_another_depth_in_op_counts():
    base = step_graph.child(TINY, "")
    again = step_graph.child(TINY, "")  # a second model in this process (layer names and gradient ids count on)
    wider = step_graph.child(TINY, "model.widths=[16,32,96]")
    deeper = step_graph.child(TINY, "model.units_per_stage=2")
    assert again["digest"] == base["digest"] and step_graph.compare(base, again) == "identical"
    assert wider["ops"] == base["ops"] and wider["digest"] != base["digest"]
    assert re.fullmatch(r"\d+ nodes differ \(same op counts\): `.+", step_graph.compare(base, wider))
    assert step_graph.compare(base, deeper).startswith("op counts differ: ")
    assert "Conv2D " in step_graph.compare(base, deeper)  # more convolutions, counted


@pytest.mark.parametrize(("args", "message"), [
    (["HEAD"], "give two or more revisions"),
    (["HEAD", "no-such-revision"], "error: 'no-such-revision': no such revision in "),
    (["HEAD", "HEAD", "--name", "../x"], "--name: a file name without folder or extension, got '../x'"),
    # was traced, then written as recheck.md.md and recheck.md.json
    (["HEAD", "HEAD", "--params", TINY, "--overrides", "", "--name", "recheck.md"],
     "--name: a file name without folder or extension, got 'recheck.md'"),
    (["HEAD", "HEAD", "--params", TINY, "--overrides", "", "--name", "recheck.json"],
     "--name: a file name without folder or extension, got 'recheck.json'"),
    (["HEAD", "HEAD", "--params", "params/nosuch.yaml"], "--params: no file params/nosuch.yaml"),
])
def test_bad_arguments_exit_2_naming_them_before_tracing(results, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        step_graph.main(args)
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert list(results.iterdir()) == []


def test_a_step_that_cannot_be_traced_is_one_line_naming_the_revision(results, capsys):
    with pytest.raises(SystemExit) as info:
        step_graph.main(["HEAD", ".", "--params", TINY, "--overrides", "model.arch=nosuch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: tracing the step at ") and "model.arch" in err[0], err
    assert list(results.iterdir()) == []


def test_the_readme_command_writes_the_report_its_row_links(results, monkeypatch):
    row = next(line for line in (step_graph.ROOT / "README.md").read_text().splitlines()
               if line.startswith("| `python -m bench.step_graph "))
    command = re.match(r"\| `python -m bench\.step_graph ([^`]+)`", row).group(1)
    linked = re.search(r"\]\(bench/results/([^)]+)\)", row).group(1)
    traced = {"nodes": 1, "functions": 0, "digest": "0" * 64, "node_digests": {"n": "0"}, "ops": {"Op": 1},
              "dtype_policy": "float32", "jit_compile": False}
    monkeypatch.setattr(step_graph, "trace_at", lambda *args: dict(traced))
    step_graph.main(shlex.split(command))
    assert (results / linked).is_file(), (command, sorted(path.name for path in results.iterdir()))
