"""`byol-pytorch train`: end to end on a messy folder, resume, equivalence, signals, divergence, accumulation flag."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from byol_pytorch import BYOL
from byol_pytorch.app import cli
from byol_pytorch.app.train import get_args_parser
from byol_pytorch.app.train import main as train_main
from byol_pytorch.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def run_train(argv):
    return train_main(get_args_parser().parse_args(argv))


def learner_tensors(path):
    return load_checkpoint(path)["learner"]


def test_end_to_end_train_resume_export_on_messy_folder(messy, tmp_path, capsys, tiny_flags):
    import timm
    from safetensors.torch import load_file

    out = tmp_path / "run"
    argv = ["train", "--data", str(messy), "--out", str(out), "--max-steps", "6", "--log-every", "1"]
    assert cli.main([*argv, *tiny_flags[:-1], "2"]) == 0  # two loader workers; 6 steps = one epoch
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
        assert {"step", "epoch", "loss", "lr", "tau", "img_per_s", "proj_std", "proj_rank"} <= row.keys()
        assert 0 < row["proj_std"] <= 1 and row["proj_rank"] >= 1  # the collapse alarm's figures
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


def test_resume_equivalence_is_bitwise(messy, tmp_path, monkeypatch, tiny_flags):
    common = ["--data", str(messy), *tiny_flags, "--max-steps", "8", "--log-every", "4"]
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


def test_resume_keeps_the_runs_checkpoint_and_log_intervals_unless_given(messy, tmp_path, tiny_flags):
    """Before: a resumed run went back to --checkpoint-every 1000 and --log-every 10 (a requeued job lost up to
    1000 steps at its next preemption)."""
    out = tmp_path / "run"
    first = ["--data", str(messy), *tiny_flags, "--out", str(out), "--checkpoint-every", "2", "--log-every", "1"]
    assert run_train([*first, "--max-steps", "3"])["exit_code"] == 0
    assert run_train(["--out", str(out), "--resume", "--workers", "0", "--max-steps", "6"])["step"] == 6
    saved = load_checkpoint(out / "last.pt")["args"]
    assert (saved["checkpoint_every"], saved["log_every"]) == (2, 1)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    again = ["--out", str(out), "--resume", "--workers", "0", "--max-steps", "8", "--checkpoint-every", "5"]
    assert run_train(again)["step"] == 8
    assert load_checkpoint(out / "last.pt")["args"]["checkpoint_every"] == 5  # a flag given wins


def test_a_run_folder_inside_the_data_is_left_out_of_its_images(tmp_path, tiny_flags, make_labelled, capsys):
    """Probe: `train --data DIR --out DIR/run` trained on its own curves.png after a resume ("images 24 -> 25"),
    and eval and embed --labels counted the run folder as a class (`cd photos; byol-pytorch train --data .`
    puts the default runs/byol there)."""
    data = make_labelled(tmp_path / "photos", classes=2, per_class=12)
    out = data / "run"
    argv = ["train", "--data", str(data), "--out", str(out), *tiny_flags]
    assert cli.main([*argv, "--max-steps", "2"]) == 0
    assert (out / "curves.png").is_file()
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "4", "--workers", "0"]) == 0
    resumed = capsys.readouterr()
    err = resumed.err
    assert "images 24 ->" not in err and "on 24 images" in resumed.out + err
    assert f"1 byol-pytorch run folder(s) under {str(data)!r} are left out of the images: 'run'" in err
    assert cli.main(["eval", "--data", str(data), "--checkpoint", str(out / "last.pt")]) == 0
    captured = capsys.readouterr()
    assert "2 classes" in captured.out and "keep --out outside --data" in captured.err
    embedded = tmp_path / "embedded"
    argv = ["embed", "--data", str(data), "--checkpoint", str(out / "last.pt"), "--out", str(embedded), "--labels"]
    assert cli.main(argv) == 0
    ids = (embedded / "ids.txt").read_text().splitlines()
    assert len(ids) == 24 and not any("run" in line for line in ids)


def test_the_largest_seed_trains(messy, tmp_path, tiny_flags):
    """Before: --seed 2**63-1 (a 64-bit seed) overflowed the loader's generator (seed * 1000 + rank)."""
    argv = ["--data", str(messy), *tiny_flags, "--out", str(tmp_path / "run"), "--max-steps", "1"]
    assert run_train([*argv, "--seed", str(2**62 - 1)])["exit_code"] == 0


def test_sigterm_in_a_subprocess_saves_and_exits_143(messy, tmp_path, tiny_flags):
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
            *tiny_flags,
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


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(messy, tmp_path, monkeypatch, capsys, tiny_flags):
    out = tmp_path / "run"
    assert run_train(["--data", str(messy), "--out", str(out), *tiny_flags, "--max-steps", "2"])["step"] == 2
    before = (out / "last.pt").read_bytes()
    (out / "curves.png").unlink()  # drawn again when the run diverges (a probe: a diverged run left none)
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
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "curves.png").stat().st_size > 0


def test_accumulate_flag_counts_optimizer_steps(messy, tmp_path, tiny_flags):
    out = tmp_path / "run"
    argv = [
        "--data",
        str(messy),
        "--out",
        str(out),
        *tiny_flags,
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


def test_val_data_runs_the_knn_monitor_and_draws_curves(messy, tmp_path, tiny_flags, make_labelled):
    labelled = make_labelled(tmp_path / "labelled", per_class=5)
    out = tmp_path / "run"
    run_train(
        [
            "--data",
            str(messy),
            "--out",
            str(out),
            *tiny_flags,
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
    assert [r["step"] for r in with_knn] == [0, 6, 8]  # the untouched net, the end of epoch 1, the end of the run
    assert with_knn[0]["knn_reference"] == with_knn[0]["knn_acc"]
    assert all(0.0 <= r["knn_acc"] <= 1.0 for r in with_knn)
    assert with_knn[-1]["knn_acc"] >= 0.5  # three plain colours, one held-out image per class
    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and min(image.size) > 200
        assert np.asarray(image.convert("L")).std() > 5


def test_views_in_one_batch_flag_is_part_of_the_recipe(messy, tmp_path, monkeypatch, capsys, tiny_flags):
    import byol_pytorch.app.train as train_module

    built = []
    real_build = train_module.build_learner

    def recording_build(recipe, net):  # the learners the runs build, in order
        built.append(real_build(recipe, net))
        return built[-1]

    monkeypatch.setattr(train_module, "build_learner", recording_build)
    out = tmp_path / "run"
    run_train(["--data", str(messy), "--out", str(out), *tiny_flags, "--max-steps", "2", "--views-in-one-batch"])
    assert built[-1].views_in_one_batch is True
    assert load_checkpoint(out / "last.pt")["args"]["views_in_one_batch"] is True
    # A resumed run keeps it without the flag.
    run_train(["--out", str(out), "--resume", "--max-steps", "3", "--workers", "0"])
    assert built[-1].views_in_one_batch is True
    # A new run without the flag forwards the views one by one (the paper's default).
    run_train(["--data", str(messy), "--out", str(tmp_path / "plain"), *tiny_flags, "--max-steps", "1"])
    assert built[-1].views_in_one_batch is False


def test_resume_reuses_the_cached_index_and_warns_when_names_changed(messy, tmp_path, tiny_flags, monkeypatch, capsys):
    from byol_pytorch.data import file_index

    past = time.time() - 3600  # folders older than the cache's racy window
    for dirpath, _, _ in os.walk(messy):
        os.utime(dirpath, (past, past))
    out = tmp_path / "run"
    assert run_train(["--data", str(messy), "--out", str(out), *tiny_flags, "--max-steps", "2"])["exit_code"] == 0
    index = file_index.load_cached_index(out / file_index.INDEX_CACHE_NAME, messy)
    assert index is not None and len(index) == 26  # 24 good, a corrupt and an empty file
    assert load_checkpoint(out / "last.pt")["dataset_digest"] == index.digest()

    walks: list[str] = []
    original = file_index._walk
    monkeypatch.setattr(file_index, "_walk", lambda root: walks.append(root) or original(root))
    resume = ["--out", str(out), "--resume", "--workers", "0", "--max-steps"]
    assert run_train([*resume, "3"])["step"] == 3
    assert walks == [] and "file list" not in capsys.readouterr().err  # the cached index, unchanged

    (messy / "b" / "corrupt.jpg").rename(messy / "b" / "zz_corrupt.jpg")  # as many files, another name
    assert run_train([*resume, "4"])["step"] == 4
    assert walks == [str(messy)]
    assert "the file list of the data changed since the checkpoint (still 26 images" in capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["dataset_digest"] != index.digest()


def test_checkpoints_carry_clean_batchnorm_statistics_without_changing_training(
    tmp_path, make_messy_folder, tiny_flags
):
    from byol_pytorch.app import cli
    from byol_pytorch.batchnorm import batchnorm_state
    from byol_pytorch.training.checkpoint import load_checkpoint
    from byol_pytorch.training.models import learner_from_checkpoint

    data = make_messy_folder(tmp_path / "images")
    runs = {}
    for stats in ("clean", "trained"):
        out = tmp_path / stats
        argv = ["train", "--data", str(data), "--out", str(out), *tiny_flags, "--max-steps", "3", "--bn-stats", stats]
        assert cli.main(argv) == 0
        runs[stats] = load_checkpoint(out / "last.pt")
    clean, trained = runs["clean"], runs["trained"]
    assert set(clean["clean_bn"]) == {"online", "target"} and trained["clean_bn"] == {}
    for name, value in trained["learner"].items():  # computing them changed nothing of the training
        assert torch.equal(value, clean["learner"][name]), name
    learner, _, statistics = learner_from_checkpoint(tmp_path / "clean" / "last.pt")
    assert statistics == "clean"
    net_stats = batchnorm_state(learner.net)
    assert all(torch.equal(net_stats[k], v) for k, v in clean["clean_bn"]["online"].items())
    key = next(k for k in net_stats if k.endswith("running_mean"))
    assert not torch.equal(clean["learner"][f"online_encoder.net.{key}"], net_stats[key])  # not the views' ones
    _, _, old = learner_from_checkpoint(tmp_path / "trained" / "last.pt")
    assert old == "missing"


def test_frozen_backbone_batchnorm_trains_with_the_statistics_it_was_built_with(
    tmp_path, make_messy_folder, tiny_flags, capsys
):
    """``--backbone-bn frozen``: the backbone's running statistics leave training as the net was built (the
    heads' still move), no clean ones are estimated, eval / export say "frozen", a resume keeps it."""
    from byol_pytorch.app import cli
    from byol_pytorch.batchnorm import batchnorm_layers, batchnorm_state
    from byol_pytorch.training.checkpoint import load_checkpoint
    from byol_pytorch.training.models import build_backbone, export_backbone, learner_from_checkpoint

    data = make_messy_folder(tmp_path / "images")
    out = tmp_path / "frozen"
    argv = ["train", "--data", str(data), "--out", str(out), *tiny_flags, "--max-steps", "2"]
    assert cli.main([*argv, "--backbone-bn", "frozen"]) == 0
    saved = load_checkpoint(out / "last.pt")
    assert saved["args"]["backbone_bn"] == "frozen" and saved["clean_bn"] == {}
    built = batchnorm_state(build_backbone(saved["args"]["model"]))  # a fresh net's: mean 0, variance 1
    for net in ("online", "target"):
        assert built and all(torch.equal(saved["learner"][f"{net}_encoder.net.{k}"], v) for k, v in built.items())
    heads = [k for k in saved["learner"] if k.startswith("online_encoder.projector") and k.endswith("running_mean")]
    assert heads and any(saved["learner"][k].abs().sum() > 0 for k in heads)  # the heads' BatchNorm trained
    learner, _, statistics = learner_from_checkpoint(out / "last.pt")
    assert statistics == "frozen" and batchnorm_layers(learner.net, frozen=False) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no clean statistics" warning: there are none to have
        export_backbone(out / "last.pt", tmp_path / "net.safetensors")
    from safetensors import safe_open

    export_backbone(out / "last.pt", tmp_path / "trained.safetensors", bn_stats="trained")
    for name in ("net", "trained"):  # the statistics it trained with, whichever were asked for
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["bn_stats"] == "frozen"
    capsys.readouterr()
    assert cli.main(["export", str(out / "last.pt"), "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert "(BatchNorm statistics frozen; load it with strict=True" in capsys.readouterr().out  # as the README says
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "3", "--backbone-bn", "batch"]) == 1
    assert "--backbone-bn batch differs from the checkpoint's frozen" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "3", "--workers", "0"]) == 0
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["step"] == 3 and resumed["args"]["backbone_bn"] == "frozen"
    assert all(torch.equal(resumed["learner"][f"online_encoder.net.{k}"], v) for k, v in built.items())
