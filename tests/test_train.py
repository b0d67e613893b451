"""`byol-pytorch train`: end to end on a messy folder, resume, equivalence, signals, divergence, accumulation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from byol_pytorch import BYOL
from byol_pytorch.app import cli
from byol_pytorch.app.train import get_args_parser
from byol_pytorch.app.train import main as train_main
from byol_pytorch.checkpoint import load_checkpoint
from byol_pytorch.engine import OptimizerStep
from byol_pytorch.optim import warmup_cosine_scheduler

TINY = [
    "--model",
    "resnet10t",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--projection-size",
    "32",
    "--projection-hidden-size",
    "64",
    "--workers",
    "0",
]
REPO = Path(__file__).resolve().parents[1]


def make_messy_folder(root: Path, good: int = 24) -> Path:
    """Nested folders of JPEG/PNG, grayscale and RGBA images, plus corrupt, empty and text files."""
    rng = np.random.default_rng(0)
    (root / "a" / "deeper").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(good):
        kind = i % 4
        size = (36 + i % 5, 44)
        if kind == 0:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "a" / f"{i}.jpg")
        elif kind == 1:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "a" / "deeper" / f"{i}.png")
        elif kind == 2:
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), "L").save(root / "b" / f"{i}_gray.png")
        else:
            Image.fromarray(rng.integers(0, 256, (*size, 4), dtype=np.uint8), "RGBA").save(root / "b" / f"{i}_rgba.png")
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "readme.txt").write_text("not an image")
    return root


def make_labelled(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        colour = np.zeros(3)
        colour[c % 3] = 200
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 25, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


@pytest.fixture
def messy(tmp_path):
    return make_messy_folder(tmp_path / "images")


def run_train(argv):
    return train_main(get_args_parser().parse_args(argv))


def learner_tensors(path):
    return load_checkpoint(path)["learner"]


def test_end_to_end_train_resume_export_on_messy_folder(messy, tmp_path, capsys):
    import timm
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert (
        cli.main(
            ["train", "--data", str(messy), "--out", str(out), "--max-steps", "6", "--log-every", "1", *TINY[:-1], "2"]
        )
        == 0
    )  # two loader workers; 6 steps = one epoch
    first = load_checkpoint(out / "last.pt")
    assert first["step"] == 6 and first["args"]["model"] == "resnet10t" and first["args"]["in_chans"] == 3
    # The corrupt and the empty file were passed over, counted, and training went on.
    assert "unreadable, empty or corrupt image files were passed over so far" in capsys.readouterr().err

    assert (
        cli.main(["train", "--out", str(out), "--resume", "--max-steps", "8", "--log-every", "1", "--workers", "0"])
        == 0
    )
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["step"] == 8 and resumed["total_steps"] == 8
    assert int(resumed["learner"]["ema_step"]) == 8  # one EMA update per optimizer step
    assert resumed["scheduler"]["last_epoch"] == 8

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rows[-1]["skipped_files"] + rows[5]["skipped_files"] > 0
    for row in rows:
        assert {"step", "epoch", "loss", "lr", "tau", "img_per_s"} <= row.keys()
        assert 0 <= row["loss"] <= 8 and row["img_per_s"] > 0 and 0.996 <= row["tau"] <= 1
    assert rows[-1]["tau"] > rows[0]["tau"]  # cosine tau rises towards 1

    exported = tmp_path / "backbone.safetensors"
    assert cli.main(["export", str(out / "last.pt"), "--out", str(exported)]) == 0
    model = timm.create_model("resnet10t", num_classes=0)
    model.load_state_dict(load_file(exported), strict=True)
    torch.testing.assert_close(model.conv1[0].weight, resumed["learner"]["online_encoder.net.conv1.0.weight"])


def _raise_sigterm_at(monkeypatch, at_step):
    original = BYOL.update_moving_average

    def update(self):
        original(self)
        if self._ema_count == at_step:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(BYOL, "update_moving_average", update)


def test_resume_equivalence_is_bitwise(messy, tmp_path, monkeypatch):
    common = ["--data", str(messy), *TINY, "--max-steps", "8", "--log-every", "4"]
    assert run_train([*common, "--out", str(tmp_path / "full")])["exit_code"] == 0

    with monkeypatch.context() as patch:
        _raise_sigterm_at(patch, 3)  # stop mid-epoch (6 batches per epoch)
        summary = run_train([*common, "--out", str(tmp_path / "split")])
    assert summary["exit_code"] == 128 + signal.SIGTERM and summary["step"] == 3
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 3
    assert run_train(["--out", str(tmp_path / "split"), "--resume", "--workers", "0", "--log-every", "4"])["step"] == 8

    full, split = learner_tensors(tmp_path / "full" / "last.pt"), learner_tensors(tmp_path / "split" / "last.pt")
    assert full.keys() == split.keys()
    for name in full:
        assert torch.equal(full[name], split[name]), name
    # The stop logs its step; the resumed run appends after it.
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4, 8]


def test_sigterm_in_a_subprocess_saves_and_exits_143(messy, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "byol_pytorch",
            "train",
            "--data",
            str(messy),
            "--out",
            str(out),
            *TINY,
            "--max-steps",
            "100000",
            "--log-every",
            "1",
            "--checkpoint-every",
            "100000",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] >= 2 and checkpoint["total_steps"] == 100000


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(messy, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run_train(["--data", str(messy), "--out", str(out), *TINY, "--max-steps", "2"])["step"] == 2
    before = (out / "last.pt").read_bytes()
    original = BYOL.forward

    def exploding(self, x, *args, **kwargs):
        return original(self, x, *args, **kwargs) * float("nan")

    monkeypatch.setattr(BYOL, "forward", exploding)
    code = cli.main(
        ["train", "--out", str(out), "--resume", "--max-steps", "6", "--checkpoint-every", "1", "--workers", "0"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("byol-pytorch: error: training diverged at step 3: the loss is nan")
    assert "last good checkpoint" in err[-1] and "(step 2)" in err[-1]
    assert (out / "last.pt").read_bytes() == before


# ---------------------------------------------------------------- accumulation and skipped steps
def _tiny_learner():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return BYOL(
        net,
        image_size=16,
        projection_size=8,
        projection_hidden_size=16,
        use_batchnorm=False,
        augment_fn=nn.Identity(),
        augment_fn2=lambda x: x.flip(-1),
    )


def test_accumulation_steps_once_and_matches_the_full_batch_gradient():
    images = torch.rand(8, 3, 16, 16)
    grads = []
    for chunks in (1, 2):
        learner = _tiny_learner()
        opt = torch.optim.SGD(learner.parameters(), lr=0.0)  # lr 0: keep the weights, read gradients
        sched = warmup_cosine_scheduler(opt, total=10, warmup=0)
        seen = {}
        opt.register_step_pre_hook(
            lambda *_, seen=seen, learner=learner: seen.update(
                {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
            )
        )
        step = OptimizerStep(learner, learner, opt, sched, "fp32", torch.device("cpu"))
        _, stepped = step(list(images.chunk(chunks)))
        assert stepped and step.steps == 1 and int(learner.ema_step) == 1 and sched.last_epoch == 1
        grads.append(seen)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_a_scaler_skipped_step_advances_neither_ema_nor_lr_schedule():
    learner = _tiny_learner()
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    sched = warmup_cosine_scheduler(opt, total=10, warmup=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss overflows to inf
    step = OptimizerStep(learner, learner, opt, sched, "fp32", torch.device("cpu"), scaler)
    before = [p.detach().clone() for p in learner.parameters()]
    lr_before = opt.param_groups[0]["lr"]
    _, stepped = step([torch.rand(4, 3, 16, 16)])
    assert not stepped and step.skipped == 1 and step.steps == 0
    assert int(learner.ema_step) == 0 and sched.last_epoch == 0 and opt.param_groups[0]["lr"] == lr_before
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    scaler.update(2.0**8)  # a sane scale: the next step is real
    _, stepped = step([torch.rand(4, 3, 16, 16)])
    assert stepped and step.steps == 1 and int(learner.ema_step) == 1 and sched.last_epoch == 1


def test_accumulate_flag_counts_optimizer_steps(messy, tmp_path):
    out = tmp_path / "run"
    argv = [
        "--data",
        str(messy),
        "--out",
        str(out),
        *TINY,
        "--batch-size",
        "8",
        "--accumulate",
        "2",
        "--max-steps",
        "3",
    ]
    assert run_train(argv)["step"] == 3
    checkpoint = load_checkpoint(out / "last.pt")
    assert int(checkpoint["learner"]["ema_step"]) == 3 and checkpoint["scheduler"]["last_epoch"] == 3
    assert checkpoint["batch_in_epoch"] == 0 and checkpoint["epoch"] == 1  # 24 images = 6 micro-batches of 4


def test_val_data_runs_the_knn_monitor_and_draws_curves(messy, tmp_path):
    labelled = make_labelled(tmp_path / "labelled", per_class=5)
    out = tmp_path / "run"
    run_train(
        [
            "--data",
            str(messy),
            "--out",
            str(out),
            *TINY,
            "--max-steps",
            "8",
            "--log-every",
            "4",
            "--val-data",
            str(labelled),
            "--val-every",
            "1",
        ]
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with_knn = [r for r in rows if "knn_acc" in r]
    assert [r["step"] for r in with_knn] == [6, 8]  # the end of epoch 1, and the end of the run
    assert all(0.0 <= r["knn_acc"] <= 1.0 for r in with_knn)
    assert with_knn[-1]["knn_acc"] >= 0.5  # three plain colours, one held-out image per class
    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and min(image.size) > 200
        assert np.asarray(image.convert("L")).std() > 5


def test_views_in_one_batch_flag_is_part_of_the_recipe(messy, tmp_path, monkeypatch, capsys):
    import byol_pytorch.app.train as train_module

    built = []
    real_build = train_module.build_learner

    def recording_build(recipe, net):  # the learners the runs build, in order
        built.append(real_build(recipe, net))
        return built[-1]

    monkeypatch.setattr(train_module, "build_learner", recording_build)
    out = tmp_path / "run"
    run_train(["--data", str(messy), "--out", str(out), *TINY, "--max-steps", "2", "--views-in-one-batch"])
    assert built[-1].views_in_one_batch is True
    assert load_checkpoint(out / "last.pt")["args"]["views_in_one_batch"] is True
    # A resumed run keeps it without the flag.
    run_train(["--out", str(out), "--resume", "--max-steps", "3", "--workers", "0"])
    assert built[-1].views_in_one_batch is True
    # A new run without the flag forwards the views one by one (the paper's default).
    run_train(["--data", str(messy), "--out", str(tmp_path / "plain"), *TINY, "--max-steps", "1"])
    assert built[-1].views_in_one_batch is False
