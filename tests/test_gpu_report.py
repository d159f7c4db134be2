"""bench.gpu_report: the GPU check's JSON files become one table, partial stages marked as such."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import gpu_report


def write(folder, name, **run):
    (folder / name).write_text(json.dumps(run))


def test_report_lists_every_stage_in_gpu_sh_order_and_marks_a_stopped_one(tmp_path):
    (tmp_path / "gpu.txt").write_text("NVIDIA H200, 143771 MiB\njax 0.11.2")
    write(tmp_path, "gpu-seed.json", params="params/default.yaml", model="preact_resnet164", epoch_seconds=[80.0, 15.0],
          steady_epoch_seconds=15.0, images_per_second=3333, projected_full_schedule_minutes=37.5,
          full_schedule_epochs=150)
    write(tmp_path, "gpu-fast.json", params="params/fast.yaml", overrides="train.feed=device ", model="resnet9",
          epoch_seconds=[30.0, 0.5, 0.5], steady_epoch_seconds=0.5, fit_seconds=31.0,
          fit_seconds_after_first_epoch=1.0, test_acc=0.91, projected_full_schedule_minutes=0.0)
    write(tmp_path, "gpu-improved.json", partial=True, params="params/improved.yaml", epoch_seconds=[120.0])
    write(tmp_path, "gpu-explore-32.json", params="params/fast.yaml", epoch_seconds=[30.0, 0.5])
    write(tmp_path, "gpu-fast-warm.json", params="params/fast.yaml", epoch_seconds=[1.5, 0.5, 0.5], fit_seconds=2.5,
          test_acc=0.91, compile_cache_programs=3)
    frame = gpu_report.rows(tmp_path)
    assert list(frame["file"]) == ["gpu-fast.json", "gpu-fast-warm.json", "gpu-improved.json", "gpu-seed.json",
                                   "gpu-explore-32.json"]
    assert frame.iloc[1]["programs loaded"] == 3  # its first epoch short by what fast compiled
    fast, improved, seed = (frame.iloc[i] for i in (0, 2, 3))
    assert (fast["test_acc"], fast["epochs"], fast["overrides"], fast["status"]) == (0.91, 3, "train.feed=device",
                                                                                     "full schedule")
    assert fast["projected min (full schedule)"] is None  # a full run reports what it measured, not a projection
    assert improved["status"] == "stopped at its time limit" and improved["projected min (full schedule)"] is None
    # the first epoch as measured (80 s: its compiles), the other 149 at the steady 15 s, not 150 x 15 s as older
    # files projected
    assert seed["projected min (full schedule)"] == 38.6 and seed["test_acc"] is None
    text = gpu_report.report(tmp_path, "2026-01-02")
    assert "NVIDIA H200" in text and "2026-01-02" in text and "nan" not in text
    assert text.count("| gpu-") == 5


def test_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(SystemExit, match="no gpu-"):
        gpu_report.rows(tmp_path)


def test_rows_carry_each_files_date_and_device_and_the_last_accuracies(tmp_path):
    write(tmp_path, "gpu-fast.json", date="2026-12-04", device_kind="NVIDIA H200", params="params/fast.yaml",
          epoch_seconds=[20.0, 0.3], acc=[0.5, 0.97], val_acc=[0.6, 0.905], test_acc=0.906, fit_seconds=21.0,
          tta_scores={"none": {"val_acc": 0.9, "test_acc": 0.8995}, "flip": {"val_acc": 0.905, "test_acc": 0.906},
                      "flip_shift": {"test_acc": 0.9071}}, compile_cache_programs=2)
    write(tmp_path, "gpu-seed.json", params="params/default.yaml", epoch_seconds=[80.0, 15.0], val_acc=[0.1, 0.2],
          projected_full_schedule_minutes=37.5)
    fast, seed = (row for _, row in gpu_report.rows(tmp_path, "2026-11-30").iterrows())
    assert (fast["date"], fast["device"], fast["last train acc"], fast["last val_acc"]) == (
        "2026-12-04", "NVIDIA H200", 0.97, 0.905)
    assert seed["date"] == "2026-11-30" and seed["device"] is None  # the file says neither: --date, no device
    # its first epoch loaded 2 programs an earlier stage compiled; a file from before the cache says nothing
    assert (fast["programs loaded"], seed["programs loaded"]) == (2, None)
    assert seed["last val_acc"] is None  # a timed stage's val_acc after 2 epochs is no result
    assert fast["val/test acc by TTA"] == "none .9000/.8995, flip .9050/.9060, flip_shift -/.9071"
    assert seed["val/test acc by TTA"] is None
    (tmp_path / "gpu-notes.md").write_text("Rows of 2026-12-04 ran commit abc.")
    assert gpu_report.report(tmp_path, "2026-11-30").rstrip().endswith("Rows of 2026-12-04 ran commit abc.")


def test_unpack_extracts_gpu_sh_files_and_refuses_anything_else(tmp_path):
    import io
    import tarfile

    def archive(name, members):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for member, text in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
        return path

    good = archive("good.tar.gz", {"./gpu.txt": "NVIDIA H200", "gpu-fast.json": json.dumps({"epoch_seconds": [1.0]}),
                                   "gpu.log": "== fast"})
    results = tmp_path / "results"
    assert gpu_report.unpack(good, results) == ["gpu-fast.json", "gpu.log", "gpu.txt"]
    assert (results / "gpu.txt").read_text() == "NVIDIA H200"
    for bad in ({"../gpu-x.json": "{}"}, {"sub/gpu-x.json": "{}"}, {"evil.sh": "rm -rf /"}):
        with pytest.raises(SystemExit, match="not a bench/gpu.sh result file"):
            gpu_report.unpack(archive("bad.tar.gz", bad), tmp_path / "other")
        assert not (tmp_path / "other").exists()  # nothing extracted from an archive with a stranger in it
    (tmp_path / "truncated.tar.gz").write_bytes(good.read_bytes()[:40])
    with pytest.raises(SystemExit, match="not a readable gpu-results.tar.gz"):
        gpu_report.unpack(tmp_path / "truncated.tar.gz", tmp_path / "other")


def test_rows_name_the_data_each_run_was_measured_on(tmp_path):
    write(tmp_path, "gpu-fast.json", params="params/fast.yaml", epoch_seconds=[2.0, 1.0], test_acc=0.3,
          data="synthetic (512 training images)", test_images=102)
    write(tmp_path, "gpu-seed.json", params="params/default.yaml", epoch_seconds=[80.0, 15.0],
          data=".data/cifar10-jpeg-q75.tar.gz", test_images=10000)
    write(tmp_path, "gpu-improved.json", params="params/improved.yaml", epoch_seconds=[100.0, 5.0])
    fast, improved, seed = (row for _, row in gpu_report.rows(tmp_path).iterrows())
    assert fast["data"] == "synthetic (512 training images), 102 test images"  # a CPU rehearsal is no JPEG run
    assert seed["data"] == "cifar10-jpeg-q75.tar.gz, 10,000 test images"
    assert improved["data"] is None  # an older file that does not say
    assert "every one of the 10,000 test images" not in gpu_report.report(tmp_path, "2026-12-04")


def test_unpack_joins_pieces_and_hands_an_unfinished_run_to_the_checkout_until_it_is_whole(tmp_path):
    """improved.yaml's 150 epochs go on over several calls: its training comes back in the archive (cut into
    pieces of 15 MiB, the machine returns 16 MiB a file), replaces the checkout's .gpu-state for the next call to
    carry, and goes once a call brings the run back whole; an archive without one (the CPU smoke's) leaves it."""
    import io
    import tarfile

    def archive(members):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    checkout, results = tmp_path / "checkout", tmp_path / "results"
    (checkout / ".gpu-state" / "improved").mkdir(parents=True)
    (checkout / ".gpu-state" / "improved" / "epoch-0010.weights.h5").write_bytes(b"older")
    weights = np.random.default_rng(0).bytes(200_000)  # incompressible: the archive is as large as the weights
    log = b"== call of 2026-12-05 10:00:00 UTC\n"  # gpu.sh packs gpu.txt and gpu.log with every call's results
    stopped = archive({"gpu.txt": b"NVIDIA H200", "gpu.log": log, "gpu-improved.json": json.dumps(
        {"partial": True, "checkpoint": ".gpu-state/improved", "epoch_seconds": [100.0] + [4.6] * 60}).encode(),
        ".gpu-state/improved/epoch-0060.weights.h5": weights,
        ".gpu-state/improved/progress.json": b"{}"})
    pieces = [stopped[i:i + 60_000] for i in range(0, len(stopped), 60_000)]
    for k, piece in enumerate(pieces):
        (tmp_path / f"gpu-results.tar.gz.part{k}").write_bytes(piece)
    assert len(pieces) >= 3
    assert gpu_report.unpack(tmp_path / "gpu-results.tar.gz", results, checkout) == ["gpu-improved.json", "gpu.log",
                                                                                         "gpu.txt"]
    state = checkout / ".gpu-state" / "improved"
    assert sorted(p.name for p in state.iterdir()) == ["epoch-0060.weights.h5", "progress.json"]  # the old one gone
    assert (state / "epoch-0060.weights.h5").read_bytes() == weights
    row = gpu_report.rows(results).iloc[0]
    assert row["status"] == "stopped short of its end; the next call goes on from its checkpoint"
    assert row["epochs"] == 61 and row["test_acc"] is None

    whole = json.dumps({"epoch_seconds": [100.0] + [4.6] * 149, "test_acc": 0.95, "resumed_at": [61],
                        "parts": [{}, {}], "data": ".data/cifar10-jpeg-q75.tar.gz"}).encode()
    smoke = json.dumps({"epoch_seconds": [6.4, 0.3, 0.3], "test_acc": 0.19, "data": "synthetic (512 training images)"})
    # the CPU smoke's archive: a whole improved run of its own, its state kept away from the checkout's
    (tmp_path / "smoke.tar.gz").write_bytes(archive({"gpu.txt": b"cpu", "gpu.log": log,
                                                                   "gpu-improved.json": smoke.encode()}))
    gpu_report.unpack(tmp_path / "smoke.tar.gz", tmp_path / "smoke", checkout)
    assert sorted(p.name for p in state.iterdir()) == ["epoch-0060.weights.h5", "progress.json"]  # still there

    # as gpu.sh packs a whole run: its result kept in .gpu-state/improved.json, the training gone
    (tmp_path / "whole.tar.gz").write_bytes(archive({"gpu.txt": b"NVIDIA H200", "gpu.log": log,
                                                     "gpu-improved.json": whole, ".gpu-state/improved.json": whole}))
    gpu_report.unpack(tmp_path / "whole.tar.gz", results, checkout)
    assert [p.name for p in (checkout / ".gpu-state").iterdir()] == ["improved.json"]  # the next call skips it
    row = gpu_report.rows(results).iloc[0]
    assert (row["status"], row["test_acc"], row["epochs"]) == ("full schedule over 2 calls", 0.95, 150)
    assert row["programs loaded"] is None  # recorded by none of its calls

    # each call's loads, once recorded: the second loaded what the first compiled (.gpu-state/jax, carried)
    loads = [{"compile_cache_programs": 0}, {"compile_cache_programs": 3}]
    (results / "gpu-improved.json").write_text(json.dumps({**json.loads(whole), "parts": loads,
                                                           "compile_cache_programs": 3}))
    assert gpu_report.rows(results).iloc[0]["programs loaded"] == "0, 3"

    with pytest.raises(SystemExit, match="no such file, nor pieces"):
        gpu_report.unpack(tmp_path / "absent.tar.gz", results, checkout)


@pytest.mark.parametrize("name", [".gpu-state/../../evil", ".gpu-state/../README.md", "./.gpu-state/improved/../../x"])
def test_unpack_refuses_a_state_member_outside_gpu_state_before_touching_the_checkout(tmp_path, name):
    """A `.gpu-state/` member naming `..` was taken for training: the checkout's .gpu-state (an unfinished run's
    training) was removed and the results extracted before the archive was called unreadable."""
    import io
    import tarfile

    archive = tmp_path / "gpu-results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for member, text in {"gpu.txt": "NVIDIA H200", name: "x"}.items():
            info = tarfile.TarInfo(member)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    checkout, results = tmp_path / "checkout", tmp_path / "results"
    (checkout / ".gpu-state" / "improved").mkdir(parents=True)
    (checkout / ".gpu-state" / "improved" / "epoch-0060.weights.h5").write_bytes(b"training")
    (checkout / "README.md").write_text("readme")
    with pytest.raises(SystemExit, match=f"{name!r} is not a bench/gpu.sh result file"):
        gpu_report.unpack(archive, results, checkout)
    assert (checkout / ".gpu-state" / "improved" / "epoch-0060.weights.h5").read_bytes() == b"training"
    assert sorted(p.name for p in checkout.iterdir()) == [".gpu-state", "README.md"]
    assert (checkout / "README.md").read_text() == "readme"
    assert not results.exists()  # nothing extracted from an archive with a stranger in it


@pytest.mark.parametrize("date", ["yesterday", "2026-13-01", "30.11.2026", ""])
def test_a_bad_date_is_refused_in_one_line_before_any_report_is_written(tmp_path, date):
    """`--date yesterday` went into the table as the date the files' runs were measured."""
    import subprocess
    import sys

    write(tmp_path, "gpu-fast.json", params="params/fast.yaml", epoch_seconds=[2.0, 1.0])
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_report", "--results", str(tmp_path), "--date", date],
                          cwd=gpu_report.ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"--date: a date as YYYY-MM-DD, got {date!r}" in proc.stderr
    assert not (tmp_path / "gpu.md").exists()


def test_an_unpack_of_no_gpu_results_archive_is_one_line_exit_2_and_writes_no_report(tmp_path, monkeypatch, capsys):
    """`--unpack` of a file that is no tarball (a log, a download's error page) was one line but exit 1, as for a
    failure of this host; and a folder of no results as well."""
    import sys

    (tmp_path / "gpu-results.tar.gz").write_text("<html>403 Forbidden</html>")
    monkeypatch.setattr(sys, "argv", ["gpu_report", "--results", str(tmp_path / "results"), "--unpack",
                                      str(tmp_path / "gpu-results.tar.gz")])
    with pytest.raises(SystemExit) as exc:
        gpu_report.main()
    line = capsys.readouterr().err
    assert exc.value.code == 2 and line.startswith(f"error: {tmp_path / 'gpu-results.tar.gz'}: not a readable "
                                                   "gpu-results.tar.gz (") and line.count("\n") == 1, line
    assert not list((tmp_path / "results").glob("gpu*"))  # no report, nothing unpacked
    monkeypatch.setattr(sys, "argv", ["gpu_report", "--results", str(tmp_path / "results")])
    with pytest.raises(SystemExit) as exc:
        gpu_report.main()
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_a_log_of_several_calls_says_not_run_only_of_the_last_calls_stages(tmp_path):
    """bench/gpu.sh appends each call to gpu.log (OUT=bench/results, the default): a stage that failed in an earlier
    call, and was not part of the last, was reported `not run: failed` under the last call's date."""
    (tmp_path / "gpu.log").write_text("\n".join([
        "== call of 2026-12-01 10:00:00 UTC",
        "== fast (limit 220s) 10:00:01", "Traceback (most recent call last):", "RuntimeError: out of memory",
        "== fast exit 1 10:00:30",
        "== improved (limit 400s) 10:00:31", "Epoch 1/150", "Traceback (most recent call last):",
        "FloatingPointError: NaN loss", "== improved exit 1 10:03:00",
        "== seed (limit 150s) 10:03:01", "Epoch 1/2",  # the call ended here
        "== call of 2026-12-02 10:00:00 UTC",
        "== explore-32 (limit 80s) 10:00:01", "== explore-32 exit 124 10:01:21",
        "== explore-wide skipped: 500s of 570s used, it may take 100s", ""]))
    write(tmp_path, "gpu-improved.json", partial=True, checkpoint=".gpu-state/improved", epoch_seconds=[100.0])
    write(tmp_path, "gpu-seed.json", partial=True, epoch_seconds=[80.0])
    table = {(row["file"], row["date"]): row["status"] for _, row in gpu_report.rows(tmp_path, "1999-01-01").iterrows()}
    assert table == {
        # the earlier call's files, as that call's log says they ended
        ("gpu-improved.json", "1999-01-01"): "failed after 1 epochs, exit 1: FloatingPointError: NaN loss",
        ("gpu-seed.json", "1999-01-01"): "stopped when the call ended",
        # the last call's
        ("gpu-explore-32.json", "2026-12-02"): "not run: stopped at its 80 s limit before its first epoch ended "
                                               "(it includes XLA's compiles)",
        ("gpu-explore-wide.json", "2026-12-02"): "not run: skipped, 500s of 570s used, it may take 100s"}


def test_unpack_of_a_missing_archive_in_the_results_folder_names_it_missing(tmp_path):
    """An archive path that is not there, in a results folder holding earlier results, took those for a call's
    loose files: `the call ended before bench/gpu.sh packed its files`, then a SameFileError traceback."""
    write(tmp_path, "gpu-fast.json", params="params/fast.yaml", epoch_seconds=[2.0, 1.0])
    (tmp_path / "gpu.txt").write_text("NVIDIA H200")
    with pytest.raises(SystemExit, match="gpu-results.tar.gz: no such file, nor pieces"):
        gpu_report.unpack(tmp_path / "gpu-results.tar.gz", tmp_path, tmp_path / "checkout")
    assert (tmp_path / "gpu.txt").read_text() == "NVIDIA H200"


def test_unpack_refuses_an_archive_without_any_result_file(tmp_path):
    """An empty archive (or one of folders alone) unpacked nothing, and the table of the results folder's earlier
    files was written as that call's."""
    import io
    import tarfile

    results = tmp_path / "results"
    results.mkdir()
    write(results, "gpu-fast.json", params="params/fast.yaml", epoch_seconds=[2.0, 1.0])
    archive = tmp_path / "gpu-results.tar.gz"
    for members in ({}, {".gpu-state": tarfile.DIRTYPE}):
        with tarfile.open(archive, "w:gz") as tar:
            for name, kind in members.items():
                info = tarfile.TarInfo(name)
                info.type = kind
                tar.addfile(info, io.BytesIO())
        with pytest.raises(SystemExit, match="gpu-results.tar.gz: no bench/gpu.sh result file in it"):
            gpu_report.unpack(archive, results, tmp_path / "checkout")
    assert sorted(p.name for p in results.iterdir()) == ["gpu-fast.json"]


def test_unpack_names_a_missing_piece_and_refuses_a_damaged_one_in_one_line(tmp_path):
    """A piece that did not come back, or came back damaged, was zlib's traceback (`invalid literal/length code`)."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member, data in {"gpu.txt": b"NVIDIA H200", ".gpu-state/improved/epoch-0060.weights.h5":
                             np.random.default_rng(0).bytes(200_000)}.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = buffer.getvalue()
    checkout, results, archive = tmp_path / "checkout", tmp_path / "results", tmp_path / "gpu-results.tar.gz"
    (checkout / ".gpu-state").mkdir(parents=True)
    (checkout / ".gpu-state" / "improved.json").write_text("{}")
    for k in (0, 2, 3):
        (tmp_path / f"gpu-results.tar.gz.part{k}").write_bytes(whole[k * 60_000:(k + 1) * 60_000])
    with pytest.raises(SystemExit, match=r"gpu-results.tar.gz: piece gpu-results.tar.gz.part1 missing \(found .part0, "
                                         r".part2, .part3\)"):
        gpu_report.unpack(archive, results, checkout)
    damaged = bytearray(whole[60_000:120_000])
    damaged[1000:1100] = bytes(100)
    (tmp_path / "gpu-results.tar.gz.part1").write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="gpu-results.tar.gz: not a readable gpu-results.tar.gz"):
        gpu_report.unpack(archive, results, checkout)
    assert not results.exists() and [p.name for p in (checkout / ".gpu-state").iterdir()] == ["improved.json"]


@pytest.mark.parametrize("text", ['{"epoch_seconds": [1.0', "[]", ""])
def test_a_results_file_that_is_not_a_json_record_is_one_line_naming_it(tmp_path, text):
    """A gpu-*.json cut short, or holding no record, was json's or pandas' traceback."""
    write(tmp_path, "gpu-fast.json", params="params/fast.yaml", epoch_seconds=[2.0, 1.0])
    (tmp_path / "gpu-seed.json").write_text(text)
    with pytest.raises(SystemExit, match=r"gpu-seed.json: not a bench/gpu.sh result \(.+\)$"):
        gpu_report.rows(tmp_path)


@pytest.mark.parametrize("left_out", [("gpu.txt",), ("gpu.log",), ("gpu.txt", "gpu.log")])
def test_unpack_refuses_an_archive_without_the_calls_device_line_or_log_before_extracting(tmp_path, left_out):
    """An archive with a result but no gpu.txt was taken: the table named the results folder's earlier gpu.txt, another
    call's machine, as the device of the new results (and without gpu.log, an earlier call's stages were `not run`)."""
    import io
    import tarfile

    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu.txt").write_text("NVIDIA H200, an earlier call")
    members = {"gpu.txt": "NVIDIA H100", "gpu.log": "== call of 2026-12-07 10:00:00 UTC",
               "gpu-fast.json": json.dumps({"epoch_seconds": [1.0]})}
    archive = tmp_path / "gpu-results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in members.items():
            if name not in left_out:
                info = tarfile.TarInfo(name)
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
    with pytest.raises(SystemExit, match=f"gpu-results.tar.gz: no {', '.join(left_out)} in it"):
        gpu_report.unpack(archive, results, tmp_path / "checkout")
    assert sorted(p.name for p in results.iterdir()) == ["gpu.txt"]  # nothing extracted
    assert (results / "gpu.txt").read_text() == "NVIDIA H200, an earlier call"


def test_a_stage_the_log_says_ran_whose_file_is_not_there_has_a_row_saying_so(tmp_path):
    """A stage that exited 0 (or ended an epoch) but whose gpu-NAME.json was not in the results had no row at all:
    the table read as if gpu.sh had never named it."""
    (tmp_path / "gpu.log").write_text("\n".join([
        "== call of 2026-12-07 10:00:00 UTC",
        "== fast (limit 220s) 10:00:01", "Epoch 1/24", "== fast exit 0 10:01:00",
        "== seed (limit 150s) 10:01:01", "Epoch 1/2", "== seed exit 0 10:02:00", ""]))
    write(tmp_path, "gpu-seed.json", epoch_seconds=[80.0, 15.0])
    table = {row["file"]: (row["date"], row["status"]) for _, row in gpu_report.rows(tmp_path).iterrows()}
    assert table == {"gpu-fast.json": ("2026-12-07", "no result: gpu.log says it ran (exit 0), but gpu-fast.json "
                                                     "is not in the results"),
                     "gpu-seed.json": (None, "timed")}
