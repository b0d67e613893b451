"""The byol-pytorch command: every bad input is one line and a non-zero exit; eval and preview work."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol_pytorch.app import cli
from byol_pytorch.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_flags, make_messy_folder):
    """A one-step run on a messy folder, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    data = make_messy_folder(root / "images", good=8)
    out = root / "run"
    assert cli.main(["train", "--data", str(data), "--out", str(out), *tiny_flags, "--max-steps", "1"]) == 0
    return data, out


def one_error_line(capsys, code, expected_code=1):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("byol-pytorch: error: ") and "Traceback" not in err
    return lines[0]


def test_train_without_data(capsys, tmp_path, tiny_flags):
    line = one_error_line(capsys, cli.main(["train", "--out", str(tmp_path / "r"), *tiny_flags]))
    assert "--data is required" in line


def test_train_with_missing_data_folder(capsys, tmp_path, tiny_flags):
    line = one_error_line(
        capsys, cli.main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *tiny_flags])
    )
    assert "does not exist" in line


def test_train_with_empty_data_folder(capsys, tmp_path, tiny_flags):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    line = one_error_line(
        capsys, cli.main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), *tiny_flags])
    )
    assert "no images found" in line


@pytest.mark.parametrize(
    "name, suggestion", [("resnet5O", "resnet50"), ("torchvision:resnt18", "torchvision:resnet18")]
)
def test_train_with_unknown_model_suggests_close_names(capsys, tmp_path, trained, name, suggestion, tiny_flags):
    data, _ = trained
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "r"), *tiny_flags]
    argv[argv.index("resnet10t")] = name
    line = one_error_line(capsys, cli.main(argv))
    assert f"unknown model {name!r}" in line and suggestion in line


def test_resume_without_checkpoint(capsys, tmp_path, trained, tiny_flags):
    data, _ = trained
    line = one_error_line(
        capsys, cli.main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--resume", *tiny_flags])
    )
    assert "no checkpoint" in line


def test_batch_size_one(capsys, tmp_path, trained, tiny_flags):
    data, _ = trained
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "r"), *tiny_flags]
    argv[argv.index("--batch-size") + 1] = "1"
    line = one_error_line(capsys, cli.main(argv))
    assert "--batch-size 1" in line and "at least 2" in line


def test_a_new_run_does_not_overwrite_a_checkpoint(capsys, trained, tiny_flags):
    data, out = trained
    line = one_error_line(capsys, cli.main(["train", "--data", str(data), "--out", str(out), *tiny_flags]))
    assert "already exists" in line and "--resume" in line


def test_resume_keeps_the_recipe(capsys, trained):
    _, out = trained
    line = one_error_line(capsys, cli.main(["train", "--out", str(out), "--resume", "--optimizer", "adamw"]))
    assert "--optimizer adamw differs from the checkpoint's sgd" in line
    # a probe: "--warmup-epochs 1.0 differs from the checkpoint's None" (the run took the default)
    line = one_error_line(capsys, cli.main(["train", "--out", str(out), "--resume", "--warmup-epochs", "1"]))
    assert "--warmup-epochs 1.0 differs from the checkpoint's default (the flag was not given): a resumed" in line


@pytest.mark.parametrize("command", ["resume", "export", "eval"])
def test_a_checkpoint_that_is_not_ours(capsys, tmp_path, trained, command, make_labelled):
    data, _ = trained
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    argv = {
        "resume": ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--resume", str(foreign)],
        "export": ["export", str(foreign), "--out", str(tmp_path / "x.safetensors")],
        "eval": ["eval", "--data", str(make_labelled(tmp_path / "lab")), "--checkpoint", str(foreign)],
    }[command]
    line = one_error_line(capsys, cli.main(argv))
    assert "is not a byol_pytorch checkpoint" in line


@pytest.mark.parametrize("command", ["resume", "export", "eval", "embed"])
def test_junk_bytes_and_a_run_folder_as_checkpoint_are_one_line(capsys, tmp_path, trained, command, make_labelled):
    data, out = trained
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello\n")  # the weights-only unpickler raises a KeyError on it
    labelled = str(make_labelled(tmp_path / "lab"))
    whole = (out / "last.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: len(whole) // 2])  # a copy cut short: was "not a byol_pytorch checkpoint", in circles
    for checkpoint, expected in (
        (junk, "is not a byol_pytorch checkpoint"),
        (out, "is a folder (it holds last.pt"),
        (cut, "is not a byol_pytorch checkpoint that loads: a PyTorch file damaged or cut short"),
    ):
        argv = {
            "resume": ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--resume", str(checkpoint)],
            "export": ["export", str(checkpoint), "--out", str(tmp_path / "x.safetensors")],
            "eval": ["eval", "--data", labelled, "--checkpoint", str(checkpoint)],
            "embed": ["embed", "--data", labelled, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "e")],
        }[command]
        assert expected in one_error_line(capsys, cli.main(argv))


def test_a_run_that_has_not_saved_yet_is_named_by_export(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")  # a run under way, before its first checkpoint
    line = one_error_line(capsys, cli.main(["export", str(run / "last.pt"), "--out", str(tmp_path / "x.safetensors")]))
    assert "the run in" in line and "has saved none yet, or it was moved (train saves every --checkpoint-every" in line


def test_bad_devices_are_one_line_in_every_command(capsys, tmp_path, trained, make_labelled):
    data, out = trained
    labelled = str(make_labelled(tmp_path / "lab"))
    checkpoint = str(out / "last.pt")
    for argv in (
        ["train", "--data", str(data), "--out", str(tmp_path / "r")],
        ["eval", "--data", labelled, "--checkpoint", checkpoint],
        ["embed", "--data", labelled, "--checkpoint", checkpoint, "--out", str(tmp_path / "e")],
        ["demo", "--quick"],
    ):
        assert "--device 'bogus' is not a device name" in one_error_line(capsys, cli.main([*argv, "--device", "bogus"]))
        if not torch.cuda.is_available():
            line = one_error_line(capsys, cli.main([*argv, "--device", "cuda"]))
            assert "CUDA is not available; use --device cpu" in line
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_export_and_preview_outputs_that_cannot_be_written_are_one_line(capsys, tmp_path, trained):
    data, out = trained
    folder = tmp_path / "a_folder"
    folder.mkdir()
    line = one_error_line(capsys, cli.main(["export", str(out / "last.pt"), "--out", str(folder)]))
    assert line.endswith("is a folder where a file was expected: pass a file (files saved earlier are intact)")
    assert f"'{folder}'" in line and ".tmp" not in line
    assert list(folder.iterdir()) == []
    pytest.importorskip("matplotlib")
    preview = ["preview", "--data", str(data), "--image-size", "32", "--count", "2"]
    line = one_error_line(capsys, cli.main([*preview, "--out", str(tmp_path / "views.xyz")]))
    assert "matplotlib cannot write .xyz images" in line and ".png" in line
    assert cli.main([*preview, "--out", str(tmp_path / "views")]) == 0  # no suffix: a PNG, and the line says so
    assert (tmp_path / "views.png").is_file() and f"wrote {tmp_path / 'views.png'}:" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("")
    line = one_error_line(capsys, cli.main([*preview, "--out", str(tmp_path / "a_file" / "views.png")]))
    assert "already exists and is not a folder: remove it or choose another --out" in line and "Errno" not in line
    (tmp_path / "pictures").mkdir()  # before: views drawn into pictures.png beside the folder
    line = one_error_line(capsys, cli.main([*preview, "--out", str(tmp_path / "pictures")]))
    assert line.endswith(f"--out {tmp_path / 'pictures'} is a folder; name the picture to write in it, e.g. "
                         f"{tmp_path / 'pictures'}/views.png")  # fmt: skip
    assert not (tmp_path / "pictures.png").exists()


def test_export_and_preview_refuse_outputs_that_would_mislead_and_write_through_links(capsys, tmp_path, trained):
    """Probe: export over a device node or a FIFO replaced it with a file (as root, --out /dev/null would replace
    the system's), --out DIR/ wrote a file named DIR beside the folder meant, --out x.txt silently held
    safetensors, and preview --count 400 ran for 25 minutes. A link is replaced, its target kept (a review: writing
    through would let a linked last.pt overwrite another run's checkpoint)."""
    import os

    data, out = trained
    checkpoint = str(out / "last.pt")
    os.mkfifo(tmp_path / "fifo.safetensors")
    line = one_error_line(capsys, cli.main(["export", checkpoint, "--out", str(tmp_path / "fifo.safetensors")]))
    assert "not a file but a device, FIFO or socket, which a write would replace" in line
    assert (tmp_path / "fifo.safetensors").is_fifo()
    (tmp_path / "real.safetensors").write_bytes(b"another run's file")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "real.safetensors")
    assert cli.main(["export", checkpoint, "--out", str(tmp_path / "link.safetensors")]) == 0
    assert not (tmp_path / "link.safetensors").is_symlink()  # the link is replaced, never what it points at
    assert (tmp_path / "real.safetensors").read_bytes() == b"another run's file"
    for bad, message in [
        (f"{tmp_path / 'backbones'}/", f"names a folder; name the file to write in it, e.g. {tmp_path}/backbones/"),
        (f"{tmp_path / 'b.safetensors'}/", "names a folder"),
        (str(tmp_path / "b.txt"), "name a .safetensors file (or .pt, .pth, .bin for a torch.save state dict)"),
        (str(tmp_path / "b"), "name a .safetensors file"),
    ]:
        line = one_error_line(capsys, cli.main(["export", checkpoint, "--out", bad]))
        assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.safetensors", "link.safetensors", "real.safetensors"]
    pytest.importorskip("matplotlib")
    preview = ["preview", "--data", str(data), "--image-size", "32"]
    line = one_error_line(capsys, cli.main([*preview, "--count", "65", "--out", str(tmp_path / "v.png")]))
    assert "--count between 1 and 64, got 32 and 65" in line
    line = one_error_line(capsys, cli.main([*preview, "--out", f"{tmp_path / 'pics'}/"]))
    assert f"names a folder; name the file to write in it, e.g. {tmp_path}/pics/views.png" in line
    assert not (tmp_path / "pics.png").exists()


def test_eval_says_when_a_class_has_no_readable_image(capsys, tmp_path, trained, make_labelled):
    _, out = trained
    labelled = make_labelled(tmp_path / "lab", classes=3, per_class=10)
    for image in (labelled / "class_1").iterdir():
        image.write_bytes(b"not an image")  # its files are left out (they were replaced by other classes')
    capsys.readouterr()
    assert cli.main(["eval", "--data", str(labelled), "--checkpoint", str(out / "last.pt"), "--knn"]) == 0
    captured = capsys.readouterr()
    assert "1 class(es) of" in captured.err and "no readable image (class_1)" in captured.err
    assert "16 labelled images to fit, 4 held out, 2 classes (10 unreadable images left out)" in captured.out
    for c in (0, 2):
        for name in ("4.png", "9.png"):
            (labelled / f"class_{c}" / name).write_bytes(b"")  # every held-out image now
    line = one_error_line(capsys, cli.main(["eval", "--data", str(labelled), "--checkpoint", str(out / "last.pt")]))
    assert line.endswith("--data: none of the 6 held-out images of the kNN data could be read")


def test_eval_folder_without_class_subfolders(capsys, tmp_path, trained):
    data, out = trained
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(data.rglob("*.png")), flat / "a.png")
    line = one_error_line(capsys, cli.main(["eval", "--data", str(flat), "--checkpoint", str(out / "last.pt")]))
    assert "no class sub-folders" in line


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--no-such-flag"])
    line = one_error_line(capsys, exit_info.value.code, expected_code=2)
    assert "--no-such-flag" in line


def test_console_script_prints_no_traceback(tmp_path):
    script = shutil.which("byol-pytorch")
    command = [script] if script else [sys.executable, "-m", "byol_pytorch"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [*command, "export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"byol-pytorch: error: checkpoint {str(tmp_path / 'missing.pt')!r} does not exist"
    ]


def test_eval_prints_accuracies_and_collapse_report(capsys, tmp_path, trained, make_labelled):
    _, out = trained
    labelled = make_labelled(tmp_path / "lab")
    assert cli.main(["eval", "--data", str(labelled), "--checkpoint", str(out / "last.pt"), "--knn", "--linear"]) == 0
    lines = capsys.readouterr().out.splitlines()
    knn = next(line for line in lines if line.startswith("kNN accuracy"))
    linear = next(line for line in lines if line.startswith("linear probe accuracy"))
    assert 0.5 <= float(knn.split()[-1]) <= 1.0  # three colours: easy even for a barely trained net
    assert 0.5 <= float(linear.split()[-1]) <= 1.0
    assert any(line.startswith("collapse report:") and "not collapsed" in line for line in lines)
    # A rank is at most the number of images (a probe: "of 512" for 12 images, whose ceiling is 12).
    text = "\n".join(lines)
    fit, held = map(int, re.search(r"(\d+) labelled images to fit, (\d+) held out", text).groups())
    rank, dim, most = re.search(
        r"effective rank ([0-9.]+) of (\d+)(?: \(at most (\d+) for \d+ images\))?", text
    ).groups()
    assert float(rank) <= min(fit + held, int(dim))
    assert most == (str(fit + held) if fit + held < int(dim) else None)
    assert knn.startswith(f"kNN accuracy (k={min(20, fit)}")


def test_preview_writes_a_picture(tmp_path, trained):
    pytest.importorskip("matplotlib")
    data, _ = trained
    out = tmp_path / "views.png"
    assert cli.main(["preview", "--data", str(data), "--out", str(out), "--image-size", "32", "--count", "3"]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and min(image.size) > 100
        assert np.asarray(image.convert("L")).std() > 5  # not blank


def test_export_to_either_format_ends_with_the_call_that_builds_its_backbone(capsys, tmp_path, trained):
    """A README probe: 'export ends with the call that builds the headless backbone', but a .pt export said only
    'the backbone without its classifier' (the call was read back from the safetensors metadata alone)."""
    import timm

    _, run = trained
    for name in ("b.safetensors", "b.pt"):
        assert cli.main(["export", str(run / "last.pt"), "--out", str(tmp_path / name)]) == 0
        line = capsys.readouterr().out.strip()
        call = line.split("load it with strict=True into ")[1][:-1]  # the parenthesis the line closes
        assert call.startswith("timm.create_model('resnet10t'") and call.endswith("num_classes=0)"), line
        net = eval(call, {"timm": timm})  # the printed call itself builds the net the file loads into
        if name.endswith(".pt"):
            net.load_state_dict(torch.load(tmp_path / name, weights_only=True), strict=True)


def test_preview_shows_each_readable_image_once_and_counts_the_unreadable_apart(capsys, tmp_path):
    """A probe: of 2 readable files and 2 unreadable, preview drew 4 rows (one image three times, the substitute of
    each broken one) and said '4 images'; tar shards with broken samples did the same."""
    import io
    import tarfile

    pytest.importorskip("matplotlib")
    from byol_pytorch.data import ImageFolder, open_unlabelled, readable_images

    data = tmp_path / "data"
    data.mkdir()
    Image.new("L", (28, 28), 200).save(data / "a_good.png")
    Image.new("L", (28, 28), 0).save(data / "b_good.png")
    (data / "c_bad.jpg").write_text("not an image")
    (data / "d_zero.png").touch()
    argv = ["preview", "--data", str(data), "--out", str(tmp_path / "v.png"), "--image-size", "32", "--count", "8"]
    assert cli.main(argv) == 0
    assert f": 2 images from {data} (2 unreadable images passed over), each beside" in capsys.readouterr().out
    images, unreadable = readable_images(ImageFolder(data, 16), 8)
    assert unreadable == 2 and sorted(images.float().mean(dim=(1, 2, 3)).tolist()) == [0.0, 200.0]  # each once
    assert len(readable_images(ImageFolder(data, 16), 1, order=lambda n: [3, 2, 1, 0])[0]) == 1  # stops at count
    shard = tmp_path / "mix.tar"
    with tarfile.open(shard, "w") as tar:
        for key, payload in (("a.png", (data / "a_good.png").read_bytes()), ("b.png", b"broken"), ("c.txt", b"x")):
            member = tarfile.TarInfo(key)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    images, unreadable = readable_images(open_unlabelled(str(shard), 16, 3), 8)
    assert (len(images), unreadable) == (1, 2)  # a broken image and a sample with no image file


def test_preview_refuses_a_picture_inside_its_data(capsys, tmp_path, trained):
    """A probe: preview --out DATA/some/image.png wrote over the user's image (and a new picture there became data)."""
    data, _ = trained
    target = next(p for p in sorted(Path(data).rglob("*.png")) if p.is_file())
    before = target.read_bytes()
    argv = ["preview", "--data", str(data), "--out", str(target), "--image-size", "32", "--count", "2"]
    line = one_error_line(capsys, cli.main(argv))
    assert "is inside --data" in line and "write it elsewhere" in line
    assert target.read_bytes() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the address-space limit (RLIMIT_AS) is Linux's")
def test_a_command_out_of_memory_is_one_line_naming_its_size_flags(tmp_path):
    """Before: preview --image-size 30000 ended in PIL's MemoryError traceback; run under a 6 GB address-space
    limit, the real allocation fails as it does on a machine without the memory."""
    import resource

    data = tmp_path / "images" / "a"
    data.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(data / "0.png")
    limit = 6 * 1024**3

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [sys.executable, "-m", "byol_pytorch", "preview", "--data", str(data.parent), "--image-size", "30000"]
    proc = subprocess.run(
        [*command, "--count", "1", "--out", str(tmp_path / "v.png")],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        timeout=300,
        preexec_fn=cap_memory,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "byol-pytorch: error: out of memory in preview; ask for less: a smaller --image-size or --count"
    ]
    assert not (tmp_path / "v.png").exists()


def test_python_dash_m_and_help():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "byol_pytorch", "train", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0
    for flag in ("--data", "--model", "--max-steps", "--resume", "--optimizer", "--precision", "--val-data"):
        assert flag in proc.stdout
    assert "paper" in proc.stdout


def test_demo_is_wired(capsys, tmp_path, monkeypatch):
    import argparse

    demo = pytest.importorskip("byol_pytorch.app.demo")
    runs = []
    monkeypatch.setattr(demo, "run_demo", lambda args: runs.append(args) or 0)
    argv = ["--out", str(tmp_path / "demo"), "--lr", "0.01", "--quick"]
    assert cli.main(["demo", *argv]) == 0
    expected = demo.add_demo_arguments(argparse.ArgumentParser()).parse_args(argv)  # the demo's own flags
    assert len(runs) == 1 and {k: v for k, v in vars(runs[0]).items() if k not in ("command", "debug")} == vars(
        expected
    )

    def diverging(args):
        raise FloatingPointError("training diverged at step 3: the loss is nan")

    monkeypatch.setattr(demo, "run_demo", diverging)
    line = one_error_line(capsys, cli.main(["demo", *argv]))
    assert line == "byol-pytorch: error: training diverged at step 3: the loss is nan"

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "kNN accuracy before and after" in help_text and "--quick" in help_text and "--data-dir" in help_text


def test_a_finished_run_resumes_to_nothing_even_without_its_validation_data(
    tmp_path, tiny_flags, make_messy_folder, make_labelled, capsys
):
    data = make_messy_folder(tmp_path / "images", good=8)
    labelled = make_labelled(tmp_path / "val")
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), *tiny_flags, "--max-steps", "1"]
    assert cli.main([*argv, "--val-data", str(labelled)]) == 0
    shutil.rmtree(labelled)  # the run is done: its --val-data is not needed to say so
    assert cli.main(["train", "--out", str(out), "--resume", "--workers", "0"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_resume_on_new_validation_data_measures_the_untouched_net_on_it(
    tmp_path, tiny_flags, make_messy_folder, make_labelled
):
    """Probe: a resume with another --val-data compared the kNN with the untouched net's figure on the old data
    (0.575 where it scored 0.64 on the new: +0.04 printed for a run 0.025 below). The figure now is the one a new
    run on that data measures at step 0 (same seed, same untouched net), and the training goes on unchanged."""
    data = make_messy_folder(tmp_path / "images", good=8)
    old = make_labelled(tmp_path / "old", classes=2, per_class=6)  # plain colours: every net scores 1.0
    new = tmp_path / "new"  # noise in three classes: a figure far from 1.0
    rng = np.random.default_rng(0)
    for i in range(24):
        (new / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(new / f"c{i % 3}" / f"{i}.png")
    flags = ["--data", str(data), *tiny_flags, "--val-every", "1", "--seed", "3"]

    def references(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(row["step"], row["knn_reference"]) for row in rows if "knn_reference" in row]

    fresh = ["train", *flags, "--out", str(tmp_path / "fresh"), "--max-steps", "1", "--val-data", str(new)]
    assert cli.main(fresh) == 0
    (step, expected), *_ = references(tmp_path / "fresh")
    assert step == 0
    for name in ("changed", "kept"):
        argv = ["train", *flags, "--out", str(tmp_path / name), "--max-steps", "1", "--val-data", str(old)]
        assert cli.main(argv) == 0
    assert references(tmp_path / "changed")[0][1] != expected  # the old data's figure differs
    resume = ["train", "--resume", "--max-steps", "2", "--workers", "0"]
    assert cli.main([*resume, "--out", str(tmp_path / "changed"), "--val-data", str(new)]) == 0
    assert cli.main([*resume, "--out", str(tmp_path / "kept")]) == 0
    assert references(tmp_path / "changed")[-1] == (1, pytest.approx(expected, abs=1e-6))
    assert load_checkpoint(tmp_path / "changed" / "last.pt")["knn_reference"] == pytest.approx(expected, abs=1e-6)
    changed, kept = (load_checkpoint(tmp_path / n / "last.pt")["learner"] for n in ("changed", "kept"))
    for key, value in kept.items():
        if key.startswith("online_encoder.") and value.is_floating_point():
            torch.testing.assert_close(changed[key], value, msg=key)


def test_a_stop_while_measuring_the_reference_on_new_validation_data_measures_it_on_the_requeue(
    tmp_path, tiny_flags, make_messy_folder, make_labelled, monkeypatch
):
    """Review: SIGTERM in that measurement saved a checkpoint with the new --val-data and no figure; the requeued
    run, seeing the same --val-data, measured nothing, and no comparison was made again."""
    import signal

    from byol_pytorch.training import validation

    data = make_messy_folder(tmp_path / "images", good=8)
    old, new = make_labelled(tmp_path / "old", classes=2, per_class=6), make_labelled(tmp_path / "new", per_class=6)
    out = tmp_path / "run"
    flags = ["--data", str(data), *tiny_flags, "--val-every", "1", "--seed", "3", "--out", str(out)]
    assert cli.main(["train", *flags, "--max-steps", "1", "--val-data", str(old)]) == 0
    measure = validation.KnnMonitor.__call__

    def stopped(self, learner):
        os.kill(os.getpid(), signal.SIGTERM)
        return measure(self, learner)

    monkeypatch.setattr(validation.KnnMonitor, "__call__", stopped)
    resume = ["train", "--resume", "--out", str(out), "--max-steps", "2", "--workers", "0", "--val-data", str(new)]
    assert cli.main(resume) == 128 + signal.SIGTERM
    assert load_checkpoint(out / "last.pt")["knn_reference"] is None
    monkeypatch.setattr(validation.KnnMonitor, "__call__", measure)
    assert cli.main(resume) == 0
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 2 and checkpoint["knn_reference"] is not None


def test_train_warns_of_validation_classes_with_no_held_out_image(
    tmp_path, tiny_flags, make_messy_folder, make_labelled, capsys
):
    """Probe: eval warned that a class with no held-out image is not scored; train's monitor on the same data said
    nothing and logged its figure as if every class counted."""
    labelled = make_labelled(tmp_path / "val")
    for extra in sorted((labelled / "class_2").iterdir())[3:]:
        extra.unlink()  # three images: every fifth is held out, so none of class_2
    data = make_messy_folder(tmp_path / "images", good=8)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), *tiny_flags, "--max-steps", "1"]
    assert cli.main([*argv, "--val-data", str(labelled)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "none held out" in line]
    assert len(warnings) == 1 and "of 2 of the 3 classes (class_2: none held out)" in warnings[0]


def test_a_copy_of_the_runs_own_checkpoint_rolls_it_back(tmp_path, tiny_flags, make_messy_folder, capsys):
    data = make_messy_folder(tmp_path / "images", good=8)
    out, other = tmp_path / "run", tmp_path / "other"
    base = ["--data", str(data), *tiny_flags]
    assert cli.main(["train", *base, "--out", str(out), "--max-steps", "1"]) == 0
    backup = out / "backup_step1.pt"
    shutil.copy(out / "last.pt", backup)
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "2", "--workers", "0"]) == 0
    # Back to step 1 from the copy kept in the run's own folder: the same run, allowed.
    assert cli.main(["train", "--out", str(out), "--resume", str(backup), "--max-steps", "3", "--workers", "0"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 3
    assert load_checkpoint(out / "last.pt")["warmup_steps"] == 0  # kept for the next resume (none in 3 steps)
    # Another run's checkpoint over this one: refused, nothing written.
    assert cli.main(["train", *base, "--out", str(other), "--max-steps", "1"]) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    argv = ["train", "--out", str(out), "--resume", str(other / "last.pt"), "--max-steps", "3", "--workers", "0"]
    assert "already holds a checkpoint" in one_error_line(capsys, cli.main(argv))
    assert (out / "last.pt").read_bytes() == before


def test_a_reader_that_closed_stdout_is_no_error(messy, tmp_path):
    """``byol-pytorch preview ... | head -0``: before, 'error: Broken pipe ('a file'); check the path ...'."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command prints its line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "byol_pytorch", "preview", "--data", str(messy), "--out", str(tmp_path / "v.png")],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141 and "error" not in done.stderr.lower(), done.stderr
    assert (tmp_path / "v.png").is_file()  # the work was done before the line that could not be printed


def test_the_packages_warnings_are_one_line_each_and_others_pass_through(capsys):
    """Before: a data-layer warning (files named with dots merging into one shard sample) came as Python's
    two-line 'path:line: UserWarning: ...' among the command's one-line messages."""
    import warnings

    from byol_pytorch.app.cli import _package_warnings_as_lines
    from byol_pytorch.data import shards

    with pytest.warns(UserWarning) as caught, _package_warnings_as_lines():
        warnings.warn_explicit("merged samples", UserWarning, shards.__file__, 1)
        warnings.warn_explicit("not ours", UserWarning, "/elsewhere/lib.py", 7)
    assert capsys.readouterr().err == "byol-pytorch: warning: merged samples\n"
    assert [(str(w.message), w.filename) for w in caught] == [("not ours", "/elsewhere/lib.py")]  # shown as before


def test_embed_re_estimates_the_statistics_of_a_checkpoint_without_clean_ones(tmp_path, tiny_flags, make_messy_folder):
    """Before (a regression of this release's kNN fix): every unlabelled item's label -1 read as unreadable, so
    embed found no image to estimate from and showed a traceback."""
    import json

    data = make_messy_folder(tmp_path / "images", good=8)  # 8 good images and broken files
    out = tmp_path / "run"
    flags = [*tiny_flags, "--max-steps", "1", "--bn-stats", "trained"]
    assert cli.main(["train", "--data", str(data), "--out", str(out), *flags]) == 0
    embed = ["embed", "--data", str(data), "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "e")]
    assert cli.main(embed) == 0
    summary = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert summary["bn_stats"] == "clean (re-estimated on 8 of these images)"  # the readable ones, no blank


@pytest.mark.parametrize(
    "command",
    [
        ["preview", "--data", "d"],
        ["export", "c.pt"],
        ["embed", "--data", "d", "--checkpoint", "c.pt"],
        ["shards", "index", "d"],
        ["demo", "--quick"],
    ],
)
def test_an_empty_out_is_one_line_in_every_command(command, capsys, tmp_path, monkeypatch):
    """Before: "PosixPath('.') has an empty name", "Device or resource busy ('.')", "'' does not exist", or (embed,
    demo) files written into the current folder."""
    monkeypatch.chdir(tmp_path)
    assert cli.main([*command, "--out", ""]) == 1
    assert capsys.readouterr().err == "byol-pytorch: error: --out is empty; name the file or folder to write\n"
    assert list(tmp_path.iterdir()) == []


def test_shards_index_of_an_image_folder_or_an_empty_one_says_what_it_is(capsys, tmp_path, make_messy_folder):
    """Before: "1 of the 1 shards of 'imgs' are missing, e.g. 'imgs'"."""
    images = make_messy_folder(tmp_path / "imgs", good=2)
    assert cli.main(["shards", "index", str(images), "--out", str(tmp_path / "i.json")]) == 1
    err = capsys.readouterr().err
    assert "holds other files than .tar shards (a folder of images? `byol-pytorch shards make" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["shards", "index", str(tmp_path / "empty"), "--out", str(tmp_path / "i.json")]) == 1
    assert "the folder is empty" in capsys.readouterr().err


@pytest.mark.parametrize("command, kept", [("embed", "--resume continues"), ("shards", "")])
def test_a_second_ctrl_c_names_what_is_kept(command, kept, capsys, monkeypatch, tmp_path):
    """Before: "interrupted" alone, also where --resume continues the work."""
    from byol_pytorch.app import cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli_module.COMMANDS, command, interrupted)
    argv = {"embed": ["embed", "--data", "d", "--checkpoint", "c", "--out", "o"], "shards": ["shards", "index", "s"]}
    assert cli.main(argv[command] + (["--out", "i.json"] if command == "shards" else [])) == 130
    err = capsys.readouterr().err
    if kept:
        assert err.startswith("byol-pytorch: interrupted (") and kept in err
    else:
        assert err == "byol-pytorch: interrupted\n"


@pytest.mark.parametrize("bn_stats, channels", [("clean", 4), ("trained", 4), ("clean", 2)])
def test_a_four_channel_net_saves_and_evaluates_with_clean_statistics(
    tmp_path, tiny_flags, make_messy_folder, make_labelled, bn_stats, channels, capsys
):
    """Before: --in-chans 4 trained, then the clean statistics fed the 3-channel images as loaded (a traceback, no
    last.pt); with --bn-stats trained, eval and embed (clean statistics re-estimated) failed the same way. A review:
    --in-chans 2 (images load with 3 channels) must run too."""
    data = make_messy_folder(tmp_path / "images", good=8)
    out = tmp_path / "run"
    flags = [*tiny_flags, "--max-steps", "2", "--in-chans", str(channels), "--bn-stats", bn_stats]
    assert cli.main(["train", "--data", str(data), "--out", str(out), *flags]) == 0, capsys.readouterr().err
    saved = load_checkpoint(out / "last.pt")
    assert (bn_stats == "clean") == bool(saved.get("clean_bn"))
    labelled = make_labelled(tmp_path / "labelled", classes=2, per_class=6)
    checkpoint = str(out / "last.pt")
    assert cli.main(["eval", "--data", str(labelled), "--checkpoint", checkpoint, "--knn"]) == 0
    embed = ["embed", "--data", str(data), "--checkpoint", checkpoint, "--out", str(tmp_path / "e")]
    assert cli.main(embed) == 0, capsys.readouterr().err
    assert np.load(tmp_path / "e" / "embeddings.npy").shape[0] == 8


@pytest.mark.parametrize(
    "command", [["embed", "--data", "d", "--checkpoint", "c.pt", "--out", "o"], ["export", "c.pt", "--out", "b.pt"]]
)
def test_commands_other_than_train_refuse_torchrun(command, monkeypatch, tmp_path, capsys):
    """DDP probe: embed under torchrun ran whole in every process; the slower one found the other's finished files
    and the launch failed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert f"process 1 of 2: {command[0]} runs in one process, and WORLD_SIZE=2 is set here" in err
    assert f"(env -u WORLD_SIZE byol-pytorch {command[0]} ...)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_errors_every_process_meets_before_the_group_are_printed_once_per_node(
    local_rank, monkeypatch, tmp_path, capsys
):
    """Multi-process probe: under torchrun, bad flags, a command that runs in one process and a device the node lacks
    were printed by every process (the same line twice on 2 processes); now by the node's first process only, the
    others exiting with the same status quietly."""
    monkeypatch.chdir(tmp_path)
    for name, value in {"WORLD_SIZE": "2", "RANK": local_rank, "LOCAL_RANK": local_rank}.items():
        monkeypatch.setenv(name, value)
    printed = local_rank == "0"
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--data", "d", "--no-such-flag"])
    assert stop.value.code == 2
    assert ("unrecognized arguments: --no-such-flag" in capsys.readouterr().err) is printed
    assert cli.main(["embed", "--data", "d", "--checkpoint", "c.pt", "--out", "o"]) == 1
    assert ("embed runs in one process" in capsys.readouterr().err) is printed
    if not torch.cuda.is_available():
        assert cli.main(["train", "--data", "d", "--out", "r", "--device", "cuda"]) == 1
        assert ("--device cuda was given but CUDA is not available" in capsys.readouterr().err) is printed
    assert list(tmp_path.iterdir()) == []


def test_an_error_that_differs_by_local_rank_is_printed_by_the_rank_that_meets_it(monkeypatch, tmp_path, capsys):
    """Review: a GPU error met by some local ranks only (LOCAL_RANK 2 of 4 on a 2-GPU machine) was marked quiet
    off LOCAL_RANK 0 and printed by no process."""
    monkeypatch.chdir(tmp_path)
    for name, value in {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.main(["train", "--data", "d", "--out", "r"]) == 1
    assert "LOCAL_RANK is 2 but this process sees 2 GPU(s)" in capsys.readouterr().err


def test_gcsfs_logs_of_its_own_retries_show_only_with_debug(monkeypatch, capsys, caplog):
    """A remote probe: gs:// with the endpoint unreachable printed 26 gcsfs tracebacks ("_request out of retries")
    around our own warning and error line."""
    import logging

    from byol_pytorch.app import cli

    def command(args):
        try:
            raise ConnectionError("Cannot connect to host")
        except ConnectionError:
            logging.getLogger("gcsfs").exception("_request out of retries on exception")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "export", command)
    before = logging.getLogger("gcsfs").level
    caplog.set_level(logging.WARNING)  # (pytest's handler stands for the stderr one Python gives such logs)
    assert cli.main(["export", "x.pt", "--out", "y.safetensors"]) == 0
    assert not [r for r in caplog.records if r.name == "gcsfs"] and "out of retries" not in capsys.readouterr().err
    assert logging.getLogger("gcsfs").level == before  # put back after the command
    assert cli.main(["export", "x.pt", "--out", "y.safetensors", "--debug"]) == 0
    shown = [r for r in caplog.records if r.name == "gcsfs"]
    assert len(shown) == 1 and shown[0].exc_info is not None and "out of retries" in shown[0].getMessage()


def test_a_tilde_in_any_path_flag_is_the_home_folder(tmp_path, messy, tiny_flags, monkeypatch, capsys):
    """Probe: `--data '~/photos'` did not exist, a quoted shard pattern under ~ was missing, and `--out=~/run`
    (which the shell leaves alone) made a folder named '~' in the working directory."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    shutil.move(messy, home / "photos")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert cli.main(["train", "--data", "~/photos", "--out=~/run", *tiny_flags, "--max-steps", "1"]) == 0
    assert (home / "run" / "last.pt").is_file() and not (work / "~").exists()
    assert cli.main(["shards", "make", "--data", "~/photos", "--out", "~/shards"]) == 0
    pattern = "~/shards/train-000000.tar"
    assert cli.main(["train", "--data", pattern, "--out", "~/run2", *tiny_flags, "--max-steps", "1"]) == 0
    assert cli.main(["export", "~/run/last.pt", "--out", "~/net.safetensors"]) == 0
    assert (home / "net.safetensors").is_file() and not (work / "~").exists()


def test_a_saved_val_data_that_is_not_found_on_a_resume_says_where_it_came_from(
    tmp_path, messy, tiny_flags, make_labelled, monkeypatch, capsys
):
    """Probe: a run started with a relative --val-data and resumed from another directory said only
    "--val-data: image folder 'val' does not exist", a flag the resume had not given."""
    make_labelled(tmp_path / "start" / "val", per_class=5)
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "start")
    argv = ["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--val-data", "val", "--max-steps", "2"]
    assert cli.main(argv) == 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    resume = ["train", "--out", str(out), "--resume", "--max-steps", "4", "--workers", "0"]
    assert cli.main(resume) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "byol-pytorch: error: --val-data (the run's, from its checkpoint: val, relative to where the run started): "
    )
    assert line.endswith("; pass --val-data to say where the labelled images are now")
    assert cli.main([*resume, "--val-data", str(tmp_path / "start" / "val")]) == 0


@pytest.mark.parametrize("command", ["train", "preview", "embed"])
def test_hf_flags_with_a_folder_are_refused_not_ignored(command, tmp_path, messy, trained, tiny_flags, capsys):
    """Probe: --image-column and --hf-split with folder data were silently ignored."""
    _, run = trained
    argv = {
        "train": ["train", "--data", str(messy), "--out", str(tmp_path / "r"), *tiny_flags, "--max-steps", "1"],
        "preview": ["preview", "--data", str(messy), "--out", str(tmp_path / "v.png")],
        "embed": ["embed", "--data", str(messy), "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "e")],
    }[command]
    for flags, said in (
        (["--image-column", "img"], "--image-column applies to hf: data only"),
        (["--hf-split", "test"], "--hf-split applies to hf: and CIFAR data only"),
        (["--image-column", "img", "--hf-split", "test"], "--image-column and --hf-split apply to hf: data only"),
    ):
        line = one_error_line(capsys, cli.main([*argv, *flags]))
        assert said in line and f"not to {str(messy)!r}; drop" in line, line
    assert not list(tmp_path.glob("[rve]*"))


@pytest.mark.parametrize(
    "argv, said",
    [
        (["train", "--data", "x", "--step", "5"], "--step 5 (did you mean --max-steps?) (see 'byol-pytorch train "
         "--help')"),
        (["shards", "make", "--data", "x", "--out", "y", "--shard-sise=5MB"], "(did you mean --shard-size?) (see "
         "'byol-pytorch shards make --help')"),
        (["eval", "--data", "x", "--checkpoint", "y", "--frobnicate"], "--frobnicate (see 'byol-pytorch eval --help')"),
    ],
)  # fmt: skip
def test_an_unknown_flag_is_named_with_its_command_and_the_closest_flag(argv, said, capsys):
    """Probe: `unrecognized arguments: --step 5 (see 'byol-pytorch --help')` named the top-level help, no flag."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and line.startswith("byol-pytorch: error: unrecognized arguments: ") and said in line


@pytest.mark.parametrize("command", ["train", "preview"])
def test_a_url_of_a_scheme_not_read_is_named_not_looked_for_as_a_file(command, tmp_path, capsys):
    """Probe: --data ftp://host/x.tar was looked for as the local file 'ftp:/host/x.tar' ("1 of the 1 shards are
    missing")."""
    argv = [
        "--data",
        "ftp://user:pw@host/x-{0..3}.tar",
        "--out",
        str(tmp_path / ("v.png" if command == "preview" else "r")),
    ]
    line = one_error_line(capsys, cli.main([command, *argv]))
    assert "'ftp://***@host/x-{0..3}.tar': ftp:// is not a scheme byol-pytorch reads; give http(s)://" in line
    assert "'pipe:curl -s URL'" in line and "missing" not in line and not list(tmp_path.iterdir())


def test_an_interrupted_train_says_whether_it_left_a_checkpoint(capsys, tmp_path, monkeypatch):
    """Before: 'checkpoints saved before are kept' also when none was (a second Ctrl-C before the first save)."""

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 130
    assert "interrupted before its first checkpoint: nothing to resume" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"saved")
    assert cli.main(argv) == 130
    assert "interrupted (the checkpoint saved before, last.pt, is kept; --resume" in capsys.readouterr().err
    other = [
        "train",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "new"),
        "--resume",
        str(tmp_path / "run/last.pt"),
    ]
    assert cli.main(other) == 130  # the review: "last.pt is kept" where new/ held none
    assert f"before its first checkpoint in {tmp_path / 'new'}: --resume {tmp_path / 'run/last.pt'} again" in (
        capsys.readouterr().err
    )


def test_fp16_on_the_cpu_is_warned_about(capsys, tmp_path, trained, tiny_flags):
    """A probe: --precision fp16 on the CPU ran 20 times slower than fp32 without a word."""
    data, _ = trained
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), *tiny_flags, "--max-steps", "1"]
    assert cli.main([*argv, "--precision", "fp16", "--device", "cpu"]) == 0
    assert "warning: --precision fp16 on the CPU: float16 arithmetic is slow there" in capsys.readouterr().err
