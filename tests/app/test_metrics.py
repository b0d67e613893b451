"""app/metrics.py: metrics.jsonl rows, resumption, rank-0-only writing, TensorBoard, curves.png."""

import json
import sys

import pytest

from byol_pytorch.app.metrics import MetricsLog, plot_curves_or_warn


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_are_written_rounded_with_non_finite_values_as_strings(tmp_path):
    log = MetricsLog(tmp_path / "run")
    log.write({"step": 1, "epoch": 0, "loss": 0.123456789, "lr": float("nan"), "tau": float("inf"), "name": "x"})
    log.write({"step": 2, "loss": -float("inf"), "skipped_files": 3})
    log.close()
    assert _rows(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "epoch": 0, "loss": 0.123457, "lr": "nan", "tau": "inf", "name": "x"},
        {"step": 2, "loss": "-inf", "skipped_files": 3},
    ]


def test_resume_keeps_rows_up_to_the_step_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # a crash cut the last line
    MetricsLog(tmp_path, resume_step=3).write({"step": 4, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in _rows(path)] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
        (4, 0.5),
    ]  # kept rows verbatim

    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')
    MetricsLog(tmp_path, resume_step=10)
    assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4, 5]

    MetricsLog(tmp_path)  # a new run starts a new file
    assert path.read_text() == ""


def test_resume_passes_over_edited_lines_and_rewrites_the_file_atomically(tmp_path, monkeypatch):
    """Before: a line {"step": null} was a TypeError traceback, a byte that is not UTF-8 an error naming no file,
    and the rewrite emptied metrics.jsonl before writing it again (a kill or a full disk there lost the history)."""
    import errno
    from pathlib import Path

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": step, "loss": 1.0}) for step in range(1, 5)]
    original = ("\n".join(rows[:2] + ['{"step": null}', '{"step": "2"}']) + "\n").encode() + b'{"x": "\xa0"}\n'
    original += ("\n".join(rows[2:]) + "\n").encode()
    path.write_bytes(original)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", full)
        with pytest.raises(OSError):
            MetricsLog(tmp_path, resume_step=2)
    assert path.read_bytes() == original and not list(tmp_path.glob("*.tmp"))  # all of it, as it was
    MetricsLog(tmp_path, resume_step=2)
    assert [r["step"] for r in _rows(path)] == [1, 2]  # the edited lines passed over
    MetricsLog(tmp_path, resume_step=2)  # nothing to drop: the file is not written again
    assert [r["step"] for r in _rows(path)] == [1, 2]


def test_a_full_disk_while_logging_names_the_file(tmp_path, monkeypatch):
    """Before: the append's OSError had no file name, and the command's line said 'a file'."""
    import contextlib
    import errno
    from pathlib import Path

    log = MetricsLog(tmp_path)

    class Full(contextlib.nullcontext):  # a file on a full disk: its write fails, naming no file
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Full(Full()))
    with pytest.raises(OSError) as caught:
        log.write({"step": 1, "loss": 1.0})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "metrics.jsonl")


def test_a_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "run", resume_step=3, tensorboard=True, enabled=False)
    log.write({"step": 1, "loss": 0.1})
    log.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_without_the_package_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        MetricsLog(tmp_path, tensorboard=True)


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "loss": 0.5})
    log.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_curves_that_cannot_be_drawn_are_one_warning(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot_curves_or_warn(tmp_path / "missing.jsonl", tmp_path / "curves.png")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("byol-pytorch: warning: curves.png skipped: ")
    assert not (tmp_path / "curves.png").exists()


def test_train_gives_tensorboard_the_curves_and_the_views_as_images(tmp_path, make_messy_folder, tiny_flags):
    """Docs probe: the docs said TensorBoard gets curves.png and views.png; it got the curves only (the views were
    drawn for W&B alone)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from byol_pytorch.app import cli

    out = tmp_path / "run"
    argv = ["train", "--data", str(make_messy_folder(tmp_path / "images")), "--out", str(out), *tiny_flags]
    assert cli.main([*argv, "--max-steps", "2", "--tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["curves", "views"]
    assert (out / "views.png").is_file()


def test_a_resumed_run_keeps_tensorboard_and_hides_what_a_crash_logged_after_its_checkpoint(
    tmp_path, make_messy_folder, tiny_flags
):
    """Probe: --resume without --tensorboard stopped TensorBoard (the README's resume gives no flags again); a run
    resumed from a checkpoint older than its last rows (a crash) logged steps 3 and 4 twice in TensorBoard, while
    metrics.jsonl dropped them; the pictures sat at step 0 in every session."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from byol_pytorch.app import cli

    out = tmp_path / "run"
    argv = ["train", "--data", str(make_messy_folder(tmp_path / "images")), "--out", str(out), *tiny_flags]
    assert cli.main([*argv, "--max-steps", "2", "--log-every", "1", "--tensorboard"]) == 0
    shutil.copy(out / "last.pt", tmp_path / "step2.pt")
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "4"]) == 0
    shutil.copy(tmp_path / "step2.pt", out / "last.pt")  # as if the run died after logging steps 3 and 4
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "5"]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    jsonl = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line],
        abs=1e-5,
    )
    assert jsonl[-1] == 5
    assert sorted(e.step for e in events.Images("curves")) == [2, 5]  # each at its session's end; step 4's purged
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "6", "--no-tensorboard"]) == 0
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]  # stopped when asked
