"""bench.gpu_report: the GPU check's JSON files become one table, partial stages marked as such."""

from __future__ import annotations

import json

import pytest

from bench import gpu_report


def write(folder, name, **run):
    (folder / name).write_text(json.dumps(run))


def test_report_lists_every_stage_in_gpu_sh_order_and_marks_a_stopped_one(tmp_path):
    (tmp_path / "gpu.txt").write_text("NVIDIA H200, 143771 MiB\njax 0.11.2")
    write(tmp_path, "gpu-seed.json", params="params/default.yaml", model="preact_resnet164", epoch_seconds=[80.0, 15.0],
          steady_epoch_seconds=15.0, images_per_second=3333, projected_full_schedule_minutes=37.5)
    write(tmp_path, "gpu-fast.json", params="params/fast.yaml", overrides="train.feed=device ", model="resnet9",
          epoch_seconds=[30.0, 0.5, 0.5], steady_epoch_seconds=0.5, fit_seconds=31.0,
          fit_seconds_after_first_epoch=1.0, test_acc=0.91, projected_full_schedule_minutes=0.0)
    write(tmp_path, "gpu-improved.json", partial=True, params="params/improved.yaml", epoch_seconds=[120.0])
    frame = gpu_report.rows(tmp_path)
    assert list(frame["file"]) == ["gpu-fast.json", "gpu-improved.json", "gpu-seed.json"]
    fast, improved, seed = (frame.iloc[i] for i in range(3))
    assert (fast["test_acc"], fast["epochs"], fast["overrides"], fast["status"]) == (0.91, 3, "train.feed=device",
                                                                                     "full schedule")
    assert fast["projected min (full schedule)"] is None  # a full run reports what it measured, not a projection
    assert improved["status"] == "stopped at its time limit" and improved["projected min (full schedule)"] is None
    assert seed["projected min (full schedule)"] == 37.5 and seed["test_acc"] is None
    text = gpu_report.report(tmp_path, "2026-01-02")
    assert "NVIDIA H200" in text and "2026-01-02" in text and "nan" not in text
    assert text.count("| gpu-") == 3


def test_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(SystemExit, match="no gpu-"):
        gpu_report.rows(tmp_path)
