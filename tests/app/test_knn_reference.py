"""Issue 25: the kNN monitor's step-0 reference, the warning below it, and the closing line of a run."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol_pytorch.app import cli
from byol_pytorch.app.fashion_mnist import DEFAULT_DATA_DIR, load_fashion_mnist
from byol_pytorch.training.checkpoint import load_checkpoint
from byol_pytorch.training.validation import BelowReference, knn_noise

WARNING = "byol-pytorch: warning: the kNN accuracy"


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def closing_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.match(r"byol-pytorch: (done|stopped|diverged)", line)]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> tuple[Path, Path]:
    """Real Fashion-MNIST test images as labelled folders: 10 per class to train on, 50 per class to validate."""
    if not (Path(DEFAULT_DATA_DIR) / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("needs Debian's dataset-fashion-mnist (installed by .ci/run)")
    images, labels = load_fashion_mnist(split="test")
    root = tmp_path_factory.mktemp("fashion")
    for name, start, count in (("train", 0, 10), ("val", 500, 50)):
        for c in range(10):
            folder = root / name / str(c)
            folder.mkdir(parents=True)
            for i, j in enumerate(np.flatnonzero(labels.numpy() == c)[start : start + count]):
                Image.fromarray(images[j, 0].numpy()).save(folder / f"{i}.png")
    return root / "train", root / "val"


def train_fashion(fashion, out, tiny_flags, lr):
    train, val = fashion
    flags = list(tiny_flags)
    flags[flags.index("--batch-size") + 1] = "16"
    argv = ["train", "--data", str(train), "--out", str(out), *flags, "--epochs", "2", "--val-data", str(val)]
    return cli.main([*argv, "--val-every", "1", "--optimizer", "sgd", "--lr", lr, "--log-every", "3"])


def test_an_absurd_learning_rate_falls_below_the_untouched_net_and_warns_once(fashion, tmp_path, capsys, tiny_flags):
    out = tmp_path / "run"
    assert train_fashion(fashion, out, tiny_flags, lr="30") == 0
    captured = capsys.readouterr()
    knn = [(r["step"], r["knn_acc"]) for r in rows(out) if "knn_acc" in r]
    reference = knn[0][1]
    assert knn[0][0] == 0 and [s for s, _ in knn] == [0, 6, 12]
    queries = 100  # every fifth of 500 validation images
    noise = 2 * float(np.hypot(knn_noise(reference, queries), knn_noise(knn[1][1], queries)))
    assert reference - knn[1][1] > noise  # the run did fall below its reference by more than the noise
    warnings = [line for line in captured.err.replace("\r", "\n").splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1, captured.err  # once: the gap at step 12 is no wider than at step 6
    assert f"{knn[1][1]:.4f} at step 6" in warnings[0] and f"untouched net's {reference:.4f}" in warnings[0]
    assert "--optimizer sgd" in warnings[0] and "100 held-out images" in warnings[0]
    closing = closing_lines(captured.out)
    assert len(closing) == 1
    assert f"kNN {knn[-1][1]:.4f} (untouched net {reference:.4f}, {knn[-1][1] - reference:+.4f})" in closing[0]


def test_a_healthy_run_stays_silent(fashion, tmp_path, capsys, tiny_flags):
    out = tmp_path / "run"
    assert train_fashion(fashion, out, tiny_flags, lr="0.05") == 0
    assert WARNING not in capsys.readouterr().err
    knn = [r["knn_acc"] for r in rows(out) if "knn_acc" in r]
    assert len(knn) == 3 and min(knn[1:]) > knn[0] - 0.1


def test_the_reference_is_logged_once_and_survives_a_resume(messy, tmp_path, tiny_flags, make_labelled, monkeypatch):
    from byol_pytorch.training.validation import KnnMonitor

    labelled = make_labelled(tmp_path / "labelled", per_class=5)
    out = tmp_path / "run"
    calls = []
    original = KnnMonitor.__call__

    def counting(self, learner):
        calls.append(int(learner.ema_step))
        return original(self, learner)

    monkeypatch.setattr(KnnMonitor, "__call__", counting)
    argv = ["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--val-data", str(labelled)]
    assert cli.main([*argv, "--max-steps", "6", "--val-every", "1"]) == 0
    first = rows(out)
    assert first[0] == {"step": 0, "epoch": 0.0, "knn_acc": first[0]["knn_acc"], "knn_reference": first[0]["knn_acc"]}
    assert calls == [0, 6]  # the untouched net, then the end of epoch 1 (= the end of the run)
    assert load_checkpoint(out / "last.pt")["knn_reference"] == first[0]["knn_reference"]

    calls.clear()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "12", "--workers", "0"]) == 0
    assert calls == [12]  # not measured again: the resumed net is no longer untouched
    after = rows(out)
    assert [r["step"] for r in after if r.get("step") == 0] == [0]
    assert [r for r in after if "knn_reference" in r] == [first[0]]
    assert load_checkpoint(out / "last.pt")["knn_reference"] == first[0]["knn_reference"]


def _stop_in_evaluation(monkeypatch, signum: int, at: int) -> list[int]:
    """The kNN monitor, given ``signum`` in the middle of its first evaluation at step ``at`` (the scheduler's stop);
    returns the list of the steps it is called at, filled as the run goes."""
    import os
    import time

    from byol_pytorch.training.validation import KnnMonitor

    original, calls = KnnMonitor.__call__, []

    def signalled(self, learner):
        calls.append(int(learner.ema_step))
        if calls[-1] == at and calls.count(at) == 1:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # not reached: the evaluation is given up at once
            raise AssertionError("the evaluation went on after the signal")
        return original(self, learner)

    monkeypatch.setattr(KnnMonitor, "__call__", signalled)
    return calls


@pytest.mark.parametrize("signum", [15, 2])  # SIGTERM, SIGINT
def test_a_stop_during_the_untouched_nets_evaluation_saves_a_checkpoint_to_resume(
    signum, messy, tmp_path, tiny_flags, make_labelled, monkeypatch, capsys
):
    """Before: the signal killed the process in the first evaluation, with no checkpoint and no line (exit 143),
    and a requeued --resume found nothing to resume."""
    labelled = make_labelled(tmp_path / "labelled", per_class=5)
    out = tmp_path / "run"
    calls = _stop_in_evaluation(monkeypatch, signum, at=0)
    argv = ["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--val-data", str(labelled)]
    assert cli.main([*argv, "--max-steps", "4"]) == 128 + signum
    captured = capsys.readouterr()
    name = {15: "SIGTERM", 2: "SIGINT"}[signum]
    assert f"stopped by {name} at step 0; checkpoint saved to {out / 'last.pt'}" in captured.err
    assert closing_lines(captured.out)[0].startswith(f"byol-pytorch: stopped by {name}: 0 steps")
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 0 and checkpoint["knn_reference"] is None
    assert cli.main(["train", "--out", str(out), "--resume", "--workers", "0"]) == 0
    assert calls == [0, 0, 4]  # the untouched net measured again by the resumed run, then at the end
    assert load_checkpoint(out / "last.pt")["step"] == 4 and [r["step"] for r in rows(out)][0] == 0


@pytest.mark.parametrize("signum, at", [(15, 6), (2, 6), (15, 12)])  # in an epoch's evaluation, in the last one
def test_a_stop_during_a_later_evaluation_gives_it_up_and_saves_at_once(
    signum, at, messy, tmp_path, tiny_flags, make_labelled, monkeypatch, capsys
):
    """Probe: a stop in the evaluation after the last step was noted for a step that never came; the evaluation
    ran to its end, and a kill after a scheduler's grace period lost every step since the last periodic
    checkpoint (1,000 by default). In an epoch's evaluation the run went on for one more step before saving."""
    import signal

    labelled = make_labelled(tmp_path / "labelled", per_class=5)
    out = tmp_path / "run"
    calls = _stop_in_evaluation(monkeypatch, signum, at)
    argv = ["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--val-data", str(labelled)]
    assert cli.main([*argv, "--max-steps", "12", "--val-every", "1"]) == 128 + signum
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    if at < 12:
        assert f"stopped by {name} at step {at}; checkpoint saved to {out / 'last.pt'}; continue with --resume" in err
    else:
        assert (
            f"stopped by {name} after the run's last step (12); checkpoint saved to {out / 'last.pt'}: the training is "
            "complete; not made: the last kNN evaluation and curves.png"
        ) in err
    assert load_checkpoint(out / "last.pt")["step"] == at and calls == [0, 6, 12][: calls.index(at) + 1]
    last = rows(out)[-1]
    assert last["step"] == at and "loss" in last and "knn_acc" not in last  # the stopped step's row, no kNN
    assert cli.main(["train", "--out", str(out), "--resume", "--workers", "0"]) == 0
    assert calls[-1] == 12 and load_checkpoint(out / "last.pt")["step"] == 12


@pytest.mark.parametrize("val", [True, False])
def test_a_stop_in_the_last_step_makes_no_evaluation_and_says_what_was_not_made(
    val, messy, tmp_path, tiny_flags, make_labelled, monkeypatch, capsys
):
    """Review: a stop seen in the last step (or the steps before an epoch's end) still ran the whole evaluation,
    and the line then named an evaluation cut short that had run, or, without --val-data, none at all."""
    import os
    import signal

    from byol_pytorch.training.engine import Engine
    from byol_pytorch.training.validation import KnnMonitor

    calls, original_call, original_step = [], KnnMonitor.__call__, Engine._step

    def counted(self, learner):
        calls.append(int(learner.ema_step))
        return original_call(self, learner)

    def step(self, batch, state):
        loss = original_step(self, batch, state)
        if state.step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's stop, during the last step
        return loss

    monkeypatch.setattr(KnnMonitor, "__call__", counted)
    monkeypatch.setattr(Engine, "_step", step)
    out = tmp_path / "run"
    argv = ["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--max-steps", "12"]
    if val:
        argv += ["--val-data", str(make_labelled(tmp_path / "labelled", per_class=5)), "--val-every", "1"]
    assert cli.main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert calls == ([0, 6] if val else [])  # not at 12: the stop came first
    not_made = "the last kNN evaluation and curves.png" if val else "curves.png"
    assert f"the training is complete; not made: {not_made}\n" in err
    assert load_checkpoint(out / "last.pt")["step"] == 12 and "knn_acc" not in rows(out)[-1]


def test_val_data_with_no_readable_image_is_one_line_naming_the_flag(
    messy, tmp_path, capsys, tiny_flags, make_labelled
):
    """Before: a traceback (the first evaluation ran outside the run's error handling; a review caught it raising
    a plain ValueError mid-run too)."""
    labelled = make_labelled(tmp_path / "labelled", per_class=5)
    for image in labelled.rglob("*.png"):
        image.write_bytes(b"")
    argv = ["train", "--data", str(messy), "--out", str(tmp_path / "run"), *tiny_flags, "--val-data", str(labelled)]
    assert cli.main([*argv, "--max-steps", "2"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("byol-pytorch: error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0] == (
        "byol-pytorch: error: --val-data: none of the 12 bank images of the kNN data could be read; give images "
        "that can be read"
    )  # at the start: no 'was it moved?', no --resume without a checkpoint (a review)


def test_the_closing_line_names_the_checkpoint_that_exists(messy, tmp_path, capsys, tiny_flags):
    out = tmp_path / "run"
    argv = ["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--max-steps", "3", "--log-every", "1"]
    assert cli.main(argv) == 0
    (line,) = closing_lines(capsys.readouterr().out)
    assert line.startswith("byol-pytorch: done: 3 steps (0 -> 3) in ")
    match = re.search(r"; checkpoint (\S+) \(step 3\)\. Next: byol-pytorch export (\S+) ", line)
    assert match and Path(match[1]) == out / "last.pt" == Path(match[2])
    assert load_checkpoint(Path(match[1]))["step"] == 3
    assert float(re.search(r"([\d.]+) img/s", line)[1]) > 0 and "kNN" not in line  # no monitor, no kNN
    assert "byol-pytorch eval --data" in line and "byol-pytorch embed --data" in line


def test_the_closing_line_of_a_diverged_run(messy, tmp_path, capsys, monkeypatch, tiny_flags):
    from byol_pytorch import BYOL

    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--max-steps", "2"]) == 0
    capsys.readouterr()
    original = BYOL.forward
    monkeypatch.setattr(BYOL, "forward", lambda self, x, *a, **k: original(self, x, *a, **k) * float("nan"))
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "6", "--workers", "0"]) == 1
    (line,) = closing_lines(capsys.readouterr().out)
    assert line.startswith("byol-pytorch: diverged at step 3: 1 step (2 -> 3) in ")
    assert f"checkpoint {out / 'last.pt'} (step 2)" in line and load_checkpoint(out / "last.pt")["step"] == 2


def test_below_reference_noise_and_repeats():
    watch = BelowReference(0.6, queries=400)
    se = np.hypot(np.sqrt(0.6 * 0.4 / 400), np.sqrt(0.5 * 0.5 / 400))
    assert watch.noise(0.5) == pytest.approx(2 * se)
    assert watch.check(0.55) is None  # 0.05 < 2 se (0.069)
    assert watch.check(0.5) == pytest.approx(0.1)
    assert watch.check(0.48) is None  # wider, but not by more than the noise
    assert watch.check(0.40) == pytest.approx(0.2)
    assert watch.check(0.62) is None
    assert BelowReference(1.0, queries=3).noise(1.0) == pytest.approx(1 / 3)  # never below one image


def test_the_trainer_measures_the_untouched_net_first(tmp_path, make_labelled):
    import timm

    from byol_pytorch.training.trainer import BYOLTrainer, MockDataset

    labelled = make_labelled(tmp_path / "labelled", per_class=5)
    for image in (labelled / "class_1").iterdir():
        image.write_bytes(b"not an image")  # named once, whatever the number of evaluations
    net = timm.create_model("resnet10t", num_classes=0, pretrained=False)
    trainer = BYOLTrainer(
        net,
        dataset=MockDataset(32, 8),
        image_size=32,
        hidden_layer="auto",
        learning_rate=1e-3,
        num_train_steps=4,
        batch_size=4,
        checkpoint_every=2,
        checkpoint_folder=str(tmp_path / "ckpt"),
        byol_kwargs=dict(projection_size=16, projection_hidden_size=32),
        seed=0,
        val_data=str(labelled),
    )
    with pytest.warns(UserWarning, match=r"have no readable image \(class_1\)") as caught:
        result = trainer()
    assert sum("no readable image" in str(w.message) for w in caught) == 1
    assert [step for step, _ in trainer.knn] == [0, 2, 4]
    assert result["knn_reference"] == trainer.knn[0][1] and result["knn"] == trainer.knn[-1][1]
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy in trainer.knn)
    assert torch.is_tensor(trainer.step) and int(trainer.step) == 4


def test_val_data_with_a_class_of_no_readable_image_is_named_once(messy, tmp_path, capsys, tiny_flags, make_labelled):
    labelled = make_labelled(tmp_path / "lab", classes=3, per_class=10)
    for image in (labelled / "class_2").iterdir():
        image.write_bytes(b"not an image")  # the class drops out of every evaluation
    argv = ["train", "--data", str(messy), "--out", str(tmp_path / "run"), *tiny_flags, "--val-data", str(labelled)]
    assert cli.main([*argv, "--max-steps", "6", "--val-every", "1"]) == 0  # evaluated at steps 0 and 6
    err = capsys.readouterr().err
    assert err.count("no readable image") == 1 and "1 class(es) of" in err and "(class_2)" in err


def test_the_closing_line_commands_paste_into_a_shell(messy, tmp_path, capsys, tiny_flags):
    """Before: a path with a space or a brace pattern was printed bare, and the pasted command split or expanded."""
    data = tmp_path / "my {a,b} data"
    shutil.copytree(messy, data)
    out = tmp_path / "run two"
    assert cli.main(["train", "--data", str(data), "--out", str(out), *tiny_flags, "--max-steps", "2"]) == 0
    (line,) = closing_lines(capsys.readouterr().out)
    commands = [shlex.split(part) for part in line.split(". Next: ", 1)[1].split(" | ")]
    checkpoint = str(out / "last.pt")
    assert commands[0] == ["byol-pytorch", "export", checkpoint, "--out", "backbone.safetensors"]
    assert commands[2] == [
        "byol-pytorch",
        "embed",
        "--data",
        str(data),
        "--checkpoint",
        checkpoint,
        "--out",
        "embeddings/",
    ]


def test_the_closing_line_embed_keeps_the_image_column_and_split():
    from types import SimpleNamespace

    from byol_pytorch.app.train import _next_commands

    prepared = SimpleNamespace(
        args=SimpleNamespace(image_column="img", hf_split="validation"), run_args={"data": "hf:data/train.parquet"}
    )
    embed = shlex.split(_next_commands(prepared, Path("runs/byol/last.pt")).split(" | ")[2])
    assert embed[2:8] == ["--data", "hf:data/train.parquet", "--image-column", "img", "--hf-split", "validation"]
