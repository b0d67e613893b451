"""The fault suite: kills, signals, hostile folders and checkpoints, full and read-only disks, a dead peer, fuzz.

Every case ends in one of: the run finishes (bitwise equal to an uninterrupted run), or
one line ``byol-pytorch: error: ...`` and a non-zero exit, with nothing saved lost and no
hang. The Python API raises only TypeError, ValueError or FloatingPointError.

``BYOL_FAULTS_EXAMPLES`` sets the fuzz examples (default 150 per property; thousands for
a long run). With ``BYOL_FAULTS_REPORT=FILE`` each test appends what it injected and what
held as JSON lines; ``benchmarks/faults_summary.py`` turns them into docs/FAULTS.md.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from byol_pytorch import BYOL
from byol_pytorch.app import cli
from byol_pytorch.data import folder
from byol_pytorch.data.file_index import index_images
from byol_pytorch.data.folder import ImageFolder
from byol_pytorch.training.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("BYOL_FAULTS_EXAMPLES", "150"))
API_ERRORS = (TypeError, ValueError, FloatingPointError)
# A 0.5M-parameter timm ResNet: the smallest real backbone, so that every kill and
# resume stays a few seconds on two CPU cores.
FLAGS = (
    "--model",
    "test_resnet",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--projection-size",
    "16",
    "--projection-hidden-size",
    "32",
    "--workers",
    "0",
)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def record(fault: str, injected: int, held: str, seconds: float | None = None) -> None:
    """Append one row of the fault table (only when ``BYOL_FAULTS_REPORT`` names a file)."""
    target = os.environ.get("BYOL_FAULTS_REPORT")
    if target:
        row = {"fault": fault, "injected": injected, "held": held, "seconds": seconds}
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *needles: str) -> str:
    """Non-zero exit, the last stderr line is our one error line, and no traceback at all."""
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("byol-pytorch: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def learner_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["learner"]


def assert_bitwise_equal(a: Path, b: Path) -> None:
    first, second = learner_tensors(a), learner_tensors(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def train_argv(data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *FLAGS, *[str(e) for e in extra]]


def popen(argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *argv], env=kwargs.pop("env", ENV), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the process ended (rc {proc.returncode}) before the fault was injected: {err[-2000:]!r}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out waiting for the process to reach the fault")


def metric_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def images(tmp_path_factory, make_messy_folder) -> Path:
    return make_messy_folder(tmp_path_factory.mktemp("faults") / "images", good=12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images) -> Path:
    """An uninterrupted 6-step run: what every interrupted one must equal bitwise."""
    out = tmp_path_factory.mktemp("reference") / "run"
    torch.set_num_threads(1)
    assert cli.main(train_argv(images, out, "--max-steps", 6, "--log-every", 1, "--checkpoint-every", 2)) == 0
    return out / "last.pt"


# ---------------------------------------------------------------------- kills and signals
SLOW_SAVE = """
import os, sys, time, torch
original = torch.save
calls = [0]
def save(obj, f, *args, **kwargs):
    original(obj, f, *args, **kwargs)
    calls[0] += 1
    if calls[0] == int(os.environ["FAULT_HANG_AT_SAVE"]):
        if hasattr(f, "flush"):
            f.flush()
        open(os.environ["FAULT_MARKER"], "w").close()
        time.sleep(600)  # killed here, the temp file written but not yet renamed
torch.save = save
from byol_pytorch.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_at_random_steps_then_resume_is_bitwise(tmp_path, images, reference, capsys):
    steps = random.Random(13).sample(range(1, 6), 2)  # metrics rows seen before the kill
    started = time.time()
    for k in steps:
        out = tmp_path / f"kill{k}"
        argv = train_argv(images, out, "--max-steps", 6, "--log-every", 1, "--checkpoint-every", 2)
        proc = popen(["-m", "byol_pytorch", *argv])
        wait_for(lambda out=out, k=k: metric_rows(out) >= k and (out / "last.pt").exists(), proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        killed_at = load_checkpoint(out / "last.pt")["step"]
        code, err = run_cli(["train", "--out", out, "--resume", "--workers", 0, "--log-every", 1], capsys)
        assert code == 0, err
        assert load_checkpoint(out / "last.pt")["step"] == 6 and killed_at <= 6
        assert_bitwise_equal(out / "last.pt", reference)
    held = f"final weights bitwise equal (killed after {steps} logged steps; {time.time() - started:.0f} s in all)"
    record("SIGKILL at a random step, then --resume", len(steps), held)


def test_sigkill_during_a_save_then_resume_is_bitwise_and_cleans_the_temp_file(tmp_path, images, reference, capsys):
    out, marker = tmp_path / "run", tmp_path / "saving"
    env = dict(ENV, FAULT_HANG_AT_SAVE="2", FAULT_MARKER=str(marker))
    argv = train_argv(images, out, "--max-steps", 6, "--log-every", 1, "--checkpoint-every", 2)
    proc = popen(["-c", SLOW_SAVE, *argv], env=env)
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    temps = sorted(p.name for p in out.glob(".last.pt.*.tmp"))
    assert len(temps) == 1  # the interrupted save's temp file
    assert load_checkpoint(out / "last.pt")["step"] == 2  # the save before it survived
    code, err = run_cli(["train", "--out", out, "--resume", "--workers", 0, "--log-every", 1], capsys)
    assert code == 0, err
    assert not list(out.glob(".last.pt.*.tmp")), "the next save removes the killed save's temp file"
    assert_bitwise_equal(out / "last.pt", reference)
    record(
        "SIGKILL during a checkpoint save, then --resume", 1, "last.pt of the step before kept; temp removed; bitwise"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_and_exits_128_plus_signal(tmp_path, images, signum):
    out = tmp_path / "run"
    argv = train_argv(images, out, "--max-steps", 100000, "--log-every", 1, "--checkpoint-every", 100000)
    proc = popen(["-m", "byol_pytorch", *argv], text=True)
    wait_for(lambda: metric_rows(out) >= 2, proc)
    sent = time.time()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    seconds = time.time() - sent
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    said = f"{signal.Signals(signum).name}: stopping after this step and saving {out / 'last.pt'} for --resume"
    assert said in err  # at once, not only when the save is done (before: nothing until the end)
    assert ("Ctrl-C again quits at once" in err) == (signum == signal.SIGINT)
    assert load_checkpoint(out / "last.pt")["step"] >= 2
    record(f"{signal.Signals(signum).name} mid-run", 1, f"checkpoint saved, exit {128 + signum}", seconds)


# ---------------------------------------------------------------------- hostile image folder
def _png_bomb(path: Path, side: int = 100_000) -> None:
    """A tiny PNG that declares side x side pixels (Pillow's decompression-bomb guard refuses it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def build_hostile_folder(root: Path) -> dict[str, set[str]]:
    """Every kind of file a scraped folder holds; returns the names expected good, broken, passed over."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)

    def rgb() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))

    good = {"plain.jpg", "a b.jpg", "ïmage ü.png", "new\nline.png", "cmyk.jpg", "sixteen.png", "palette.png"}
    good |= {"exif.jpg", "anim.gif", "image.webp", "UPPER.JPG", "tall.png"}
    for name in ("plain.jpg", "a b.jpg", "ïmage ü.png", "new\nline.png", "UPPER.JPG"):
        rgb().save(root / name, format="JPEG" if name.lower().endswith("jpg") else "PNG")
    Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16)).save(root / "sixteen.png")
    rgb().convert("P").save(root / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    rgb().save(root / "exif.jpg", exif=exif)
    rgb().save(root / "anim.gif", save_all=True, append_images=[rgb(), rgb()], duration=50, loop=0)
    rgb().save(root / "image.webp")
    Image.fromarray(rng.integers(0, 256, (90, 20, 3), dtype=np.uint8)).save(root / "tall.png")
    broken = {"truncated.jpg", "zero.png", "fake.png", "bomb.png"}
    whole = io.BytesIO()
    rgb().save(whole, format="JPEG")
    (root / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "fake.png").write_text("a text file with an image suffix")
    _png_bomb(root / "bomb.png")
    passed_over = {"fifo.jpg", "dangling.png"}
    os.mkfifo(root / "fifo.jpg")
    os.symlink(root / "no such file.png", root / "dangling.png")
    (root / "notes.txt").write_text("not an image suffix: never looked at")
    return {"good": good, "broken": broken, "passed_over": passed_over}


def test_scan_passes_over_special_files_and_counts_them(tmp_path):
    expected = build_hostile_folder(tmp_path / "hostile")
    found = index_images(tmp_path / "hostile")
    assert found.passed_over == len(expected["passed_over"])  # before any open: a FIFO would block it
    assert {p.name for p in found} == expected["good"] | expected["broken"]


def test_hostile_folder_trains_and_counts_what_it_skipped(tmp_path, monkeypatch):
    expected = build_hostile_folder(tmp_path / "hostile")
    dataset = ImageFolder(tmp_path / "hostile", 37)
    assert dataset.passed_over == 2
    monkeypatch.setattr(folder, "_large_warned", False)  # once per process: another test may have warned
    with pytest.warns(folder.LargeImageWarning, match=r"bomb\.png is passed over.*BYOL_PYTORCH_MAX_IMAGE_PIXELS"):
        broken = {dataset.paths[i].name for i in range(len(dataset)) if dataset[i][1] > 0}
    assert broken == expected["broken"]
    out = tmp_path / "run"
    started = time.time()
    argv = train_argv(tmp_path / "hostile", out, "--max-steps", 4, "--log-every", 1)
    proc = subprocess.run(
        [sys.executable, "-m", "byol_pytorch", *argv], env=ENV, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 entries under" in proc.stderr and "not regular files" in proc.stderr
    assert "bomb.png is passed over" in proc.stderr and "BYOL_PYTORCH_MAX_IMAGE_PIXELS" in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["skipped_files"] >= len(expected["broken"])
    kinds = "truncated, zero-byte, fake suffix, decompression bomb; FIFO, dangling link; CMYK, 16-bit, ..."
    held = f"trained to the end; {len(broken)} broken and 2 special files counted exactly"
    record(f"hostile image folder ({kinds})", len(broken) + 2, f"{held}; the run took {time.time() - started:.0f} s")


# ---------------------------------------------------------------------- hostile checkpoints
class _RunsCode:
    """Unpickling this would create a file: a weights-only load must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, images) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    torch.set_num_threads(1)
    assert cli.main(train_argv(images, out, "--max-steps", 1)) == 0
    return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, make_labelled) -> Path:
    return make_labelled(tmp_path_factory.mktemp("labelled") / "classes", classes=2, per_class=5)


def _entry_points(path: Path, out: Path, labelled: Path) -> dict[str, list]:
    return {
        "train --resume": ["train", "--out", out, "--resume", str(path), "--max-steps", 2, "--workers", 0],
        "export": ["export", path, "--out", out / "b.safetensors"],
        "eval": ["eval", "--data", labelled, "--checkpoint", path, "--knn"],
    }


def _edited(trained: Path, tmp_path: Path, edit) -> Path:
    checkpoint = load_checkpoint(trained / "last.pt")
    edit(checkpoint)
    return save_checkpoint(tmp_path / "edited" / "last.pt", checkpoint)


def _run_everywhere(path, tmp_path, labelled, capsys, *needles, skip=()):
    lines = {}
    for name, argv in _entry_points(path, tmp_path / "out", labelled).items():
        if name not in skip:
            lines[name] = assert_one_error_line(*run_cli(argv, capsys), *needles)
    return lines


def test_malicious_and_truncated_checkpoints_at_every_entry_point(tmp_path, trained, labelled, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "byol_pytorch", "version": 1, "payload": _RunsCode(str(marker))}, evil)
    whole = (trained / "last.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole[: len(whole) // 2])
    for path in (evil, truncated):
        _run_everywhere(path, tmp_path, labelled, capsys, "is not a byol_pytorch checkpoint")
        with pytest.raises(ValueError, match="not a byol_pytorch checkpoint") as info:
            load_checkpoint(path)
        assert ("damaged or cut short" in str(info.value)) == (path == truncated)  # a refused pickle is whole
    assert not marker.exists(), "loading a checkpoint ran code"
    record(
        "malicious pickle / truncated checkpoint (resume, export, eval, load_checkpoint)", 8, "one line; no code ran"
    )


def test_checkpoint_naming_a_model_timm_does_not_know(tmp_path, trained, labelled, capsys):
    path = _edited(trained, tmp_path, lambda c: c["args"].update(model="resnet_no_such_net"))
    _run_everywhere(path, tmp_path, labelled, capsys, "unknown model 'resnet_no_such_net'")
    record("checkpoint naming an unknown model (resume, export, eval)", 3, "one line, exit 1")


def test_checkpoint_whose_heads_do_not_match_its_recipe(tmp_path, trained, labelled, capsys):
    path = _edited(trained, tmp_path, lambda c: c["args"].update(projection_size=8))
    lines = _run_everywhere(path, tmp_path, labelled, capsys, "does not fit", skip=("export",))
    assert all("size mismatch" in line for line in lines.values())
    record("checkpoint heads unlike its recipe (resume, eval)", 2, "one line, exit 1")


def test_checkpoint_without_an_optimizer_entry(tmp_path, trained, capsys):
    path = _edited(trained, tmp_path, lambda c: c.pop("optimizer"))
    argv = ["train", "--out", tmp_path / "out", "--resume", path, "--max-steps", 2, "--workers", 0]
    assert_one_error_line(*run_cli(argv, capsys), "no 'optimizer' entry")
    record("checkpoint without an optimizer entry (resume)", 1, "one line, exit 1")


# ---------------------------------------------------------------------- output location
def test_out_pointing_at_an_existing_file(tmp_path, images, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert_one_error_line(*run_cli(train_argv(images, target, "--max-steps", 1), capsys), "is a file, not a folder")
    assert target.read_text() == "keep me"
    record("--out naming an existing file", 1, "one line; the file untouched")


def test_os_errors_become_one_line_with_the_path_and_fix(tmp_path, images, capsys, monkeypatch):
    import errno

    from byol_pytorch.app import train as train_module

    for number, needle in ((errno.EACCES, "permission denied"), (errno.ENOSPC, "no space left")):

        def refuse(*args, number=number, **kwargs):
            raise OSError(number, os.strerror(number), str(tmp_path / "run" / "metrics.jsonl"))

        monkeypatch.setattr(train_module, "MetricsLog", refuse)
        line = assert_one_error_line(*run_cli(train_argv(images, tmp_path / "run", "--max-steps", 1), capsys), needle)
        assert "metrics.jsonl" in line
    monkeypatch.setenv("BYOL_PYTORCH_DEBUG", "1")
    code, err = run_cli(train_argv(images, tmp_path / "run", "--max-steps", 1), capsys)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("byol-pytorch: error: ")


NAMESPACE_SCRIPT = r"""
import contextlib, io, json, os, subprocess, sys, traceback
from pathlib import Path
from byol_pytorch.app.cli import main
from byol_pytorch.training.checkpoint import load_checkpoint

work, data, flags = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
size = int(sys.argv[4])

def mount(path, kb):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(path)], check=True)

def read_only(path):
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

def cli(*argv):
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except BaseException:
            traceback.print_exc()
    return {"code": code, "err": err.getvalue()}

train = lambda out, *extra: cli("train", "--data", data, "--out", out, *flags, *extra)
results = {}
full = work / "full"
mount(full, size * 3 // 2 // 1024)
results["full"] = train(full / "run", "--max-steps", 3, "--checkpoint-every", 1)
results["full"]["step"] = load_checkpoint(full / "run" / "last.pt")["step"]
results["full"]["temps"] = sorted(p.name for p in (full / "run").glob(".*.tmp"))
ro = work / "ro"
mount(ro, 1024)
read_only(ro)
results["ro_new"] = train(ro / "run", "--max-steps", 1)
again = work / "again"
mount(again, size * 4 // 1024)
results["first"] = train(again / "run", "--max-steps", 1)
before = (again / "run" / "last.pt").read_bytes()
read_only(again)
results["ro_resume"] = cli("train", "--out", again / "run", "--resume", "--max-steps", 2, "--workers", 0)
results["ro_resume"]["kept"] = (again / "run" / "last.pt").read_bytes() == before
print(json.dumps(results))
"""


def _can_mount_tmpfs(tmp_path: Path) -> str | None:
    """None when this process may create a private mount namespace with tmpfs; else why not."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return "needs Linux with unshare(1)"
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = f"mount -t tmpfs -o size=64k tmpfs {probe} && mount -o remount,ro {probe}"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd], capture_output=True)
    return None if proc.returncode == 0 else f"no private mount namespace here ({proc.stderr.decode()[-200:]})"


def test_full_disk_and_read_only_file_system(tmp_path, images, trained):
    why = _can_mount_tmpfs(tmp_path)
    if why:
        pytest.skip(why)
    size = (trained / "last.pt").stat().st_size
    argv = [sys.executable, "-c", NAMESPACE_SCRIPT, tmp_path, images, json.dumps(FLAGS), size]
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", *map(str, argv)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    full = results["full"]
    assert_one_error_line(full["code"], full["err"], "no space left", "last.pt")
    assert full["step"] == 1 and full["temps"] == []  # the step-1 checkpoint survived, no temp left
    assert_one_error_line(results["ro_new"]["code"], results["ro_new"]["err"], "read-only file system")
    assert results["first"]["code"] == 0, results["first"]["err"]
    assert_one_error_line(results["ro_resume"]["code"], results["ro_resume"]["err"], "read-only file system")
    assert results["ro_resume"]["kept"]
    record("full disk (ENOSPC) at a checkpoint save", 1, "one line; the previous last.pt loads; no temp left")
    record("read-only file system: new run folder; metrics.jsonl on resume", 2, "one line; last.pt unchanged")


# ---------------------------------------------------------------------- a dead peer under torchrun
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_data_folder_removed_mid_run(tmp_path, make_messy_folder):
    data = make_messy_folder(tmp_path / "images", good=12)
    out = tmp_path / "run"
    argv = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    argv += ["-m", "byol_pytorch", *train_argv(data, out, "--max-steps", 100000, "--log-every", 1)]
    proc = popen(argv, text=True)
    wait_for(lambda: metric_rows(out) >= 2, proc, timeout=240)
    shutil.rmtree(data)
    removed = time.time()
    _, err = proc.communicate(timeout=180)
    seconds = time.time() - removed
    assert proc.returncode != 0
    # Ranks share stderr with rank 0's progress bar: find the lines anywhere in it.
    ours = re.findall(r"byol-pytorch: error: process \d of 2: [^\n]*", err)
    assert len(ours) == 1, err[-3000:]  # one line for the run (the first process to fail prints it)
    assert any("--data" in line and "removed" in line for line in ours), ours
    assert "byol_pytorch/" not in err, err[-3000:]  # no traceback through our code on any rank
    record("DDP (2 ranks): the data folder removed mid-run", 1, f"{len(ours)} line(s), non-zero exit", seconds)


# ---------------------------------------------------------------------- checkpoint files
def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".last.pt.{dead.pid}.abc123.tmp"
        old = tmp_path / ".last.pt.oldstyle.tmp"
        busy = tmp_path / f".last.pt.{live.pid}.def456.tmp"
        for temp in (stale, old, busy):
            temp.write_bytes(b"half a checkpoint")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        save_checkpoint(tmp_path / "last.pt", {"step": 1})
        assert not stale.exists() and not old.exists()
        assert busy.exists()  # another live process may be writing it right now
    finally:
        live.kill()
        live.wait()
    record("temp files of killed saves", 2, "removed at the next save; a live writer's kept")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "last.pt", {"step": 1})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------- the Python API
def small_cnn(channels: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.fixture(scope="module")
def learner() -> BYOL:
    torch.manual_seed(0)
    return BYOL(small_cnn(), image_size=8, projection_size=8, projection_hidden_size=16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.float32])
def test_embedding_path_takes_every_float_dtype(learner, dtype):
    learner.eval()
    projection, embedding = learner(torch.rand(2, 3, 8, 8).to(dtype), return_embedding=True)
    assert projection.shape == (2, 8) and embedding.shape == (2, 8) and embedding.dtype == torch.float32
    learner.train()


@pytest.mark.parametrize("shape", [(2, 3, 0, 8), (2, 3, 8, 0), (2, 3, 0, 0)])
@pytest.mark.parametrize("return_embedding", [True, False])
def test_empty_images_are_a_value_error(learner, shape, return_embedding):
    with pytest.raises(ValueError, match="empty images"):
        learner(torch.rand(shape), return_embedding=return_embedding)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"projection_size": 2**31}, "projection_size must be in"),
        ({"projection_hidden_size": 2**31}, "projection_hidden_size must be in"),
        ({"channels": 2**31}, "channels must be in"),
        ({"image_size": 2**31}, "image_size must be at most"),
        ({"image_size": (8, 2**31)}, "image_size must be at most"),
        ({"image_size": 12000}, "values per image"),
        ({"projection_size": 2**20, "projection_hidden_size": 2**20}, "would hold about"),
    ],
)
def test_absurd_sizes_are_a_value_error_before_any_allocation(kwargs, match):
    kwargs = {"image_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        BYOL(small_cnn(), **kwargs)


@pytest.mark.parametrize(
    "augment, error, match",
    [
        (lambda x: None, TypeError, "augment_fn must return a tensor"),
        (lambda x: x[0], ValueError, "augment_fn must return a batch"),
        (lambda x: x[:, :1], ValueError, "augment_fn must return a batch"),
        (lambda x: x[:1], ValueError, "augment_fn must return a batch"),
        (lambda x: (x * 255).to(torch.uint8), ValueError, "non-empty float images"),
    ],
)
def test_augment_fn_results_are_checked(augment, error, match):
    learner = BYOL(small_cnn(), image_size=8, projection_size=8, projection_hidden_size=16, augment_fn=augment)
    with pytest.raises(error, match=match):
        learner(torch.rand(2, 3, 8, 8))


_SIZES = st.sampled_from([0, -1, 2**31, 2**40, True, 2.0, "8", None])
# Valid values, and for each argument the invalid ones; each example corrupts at most two.
VALID = {
    "image_size": st.one_of(st.integers(1, 24), st.just((8, 12))),
    "projection_size": st.integers(1, 48),
    "projection_hidden_size": st.integers(1, 48),
    "channels": st.sampled_from([None, 3]),
    "hidden_layer": st.sampled_from(["auto", -1, 0, "4", None]),
    "moving_average_decay": st.floats(0, 1),
    "token_pool": st.sampled_from(["mean", "cls"]),
    "augment_fn": st.sampled_from([None, "identity"]),
    "use_momentum": st.booleans(),
    "use_batchnorm": st.booleans(),
    "views_in_one_batch": st.booleans(),
    "sync_batchnorm": st.sampled_from([None, False]),
    "moving_average_total_steps": st.sampled_from([None, 1, 100]),
}
INVALID = {
    "image_size": st.sampled_from([0, -3, 2**31, 2**16, True, 3.5, "32", None, (0, 8), [8, 2**31], (8,)]),
    "projection_size": _SIZES,
    "projection_hidden_size": _SIZES,
    "channels": st.sampled_from([0, -1, 1, 5, 2**31, True, 3.0, "3"]),
    "hidden_layer": st.sampled_from([99, -99, "nope", 1.5, True]),
    "moving_average_decay": st.sampled_from([float("nan"), float("inf"), -0.1, 1.5, "x", None, True]),
    "token_pool": st.sampled_from(["max", None, 3]),
    "augment_fn": st.sampled_from([3, "fn"]),
    "use_momentum": st.booleans(),
    "use_batchnorm": st.booleans(),
    "views_in_one_batch": st.sampled_from([1, None, "yes"]),
    "sync_batchnorm": st.sampled_from([1, "yes"]),
    "moving_average_total_steps": st.sampled_from([0, -1, 2.5, 2**70]),
}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_constructor_raises_only_type_value_errors(data):
    bad = data.draw(st.sets(st.sampled_from(sorted(VALID)), max_size=2), label="corrupted")
    kwargs = {name: data.draw((INVALID if name in bad else VALID)[name], label=name) for name in VALID}
    if kwargs["augment_fn"] == "identity":
        kwargs["augment_fn"] = lambda x: x[..., :8, :8]
    image_size = kwargs.pop("image_size")
    try:
        BYOL(small_cnn(), image_size, **kwargs)
        outcome = "built"
    except API_ERRORS as error:
        outcome = type(error).__name__
    record("fuzz: BYOL(...) constructor arguments", 1, outcome)


_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int64, torch.bool]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.one_of(
        st.tuples(st.integers(0, 4), st.just(3), st.integers(0, 9), st.integers(0, 9)).map(list),  # nearly valid
        st.lists(st.integers(0, 5), min_size=0, max_size=5),
    ),
    dtype=st.sampled_from([*_DTYPES, torch.complex64]),
    other=st.sampled_from([None, None, None, None, 3, "images", np.zeros((2, 3, 8, 8))]),
    poison=st.sampled_from([None, float("nan"), float("inf")]),
    return_embedding=st.booleans(),
    return_projection=st.booleans(),
    training=st.booleans(),
)
def test_fuzz_forward_raises_only_type_value_floating_point_errors(
    learner, shape, dtype, other, poison, return_embedding, return_projection, training
):
    x = other
    if other is None:
        x = (torch.rand(shape) * 255).to(dtype)
        if poison is not None and x.is_floating_point() and x.numel():
            x.view(-1)[0] = poison
    learner.train(training)
    try:
        out = learner(x, return_embedding=return_embedding, return_projection=return_projection)
    except API_ERRORS as error:
        record("fuzz: learner(x, ...) inputs", 1, type(error).__name__)
        return
    finally:
        learner.train()
    assert isinstance(out, (torch.Tensor, tuple))
    record("fuzz: learner(x, ...) inputs", 1, "returned")


@pytest.mark.parametrize(
    "number, needle",
    [
        ("ENOSPC", "no space left"),
        ("EROFS", "read-only file system"),
        ("EACCES", "permission denied"),
        ("EEXIST", "already exists"),
        ("ENOTDIR", "is a file, not a folder"),
        ("EDQUOT", "quota"),
        ("EIO", "input/output error"),
        ("ELOOP", "check the path"),
    ],
)
def test_every_os_error_is_one_line_naming_the_path(number, needle):
    import errno

    from byol_pytorch.app.errors import describe_os_error

    code = getattr(errno, number)
    line = describe_os_error(OSError(code, os.strerror(code), "/runs/x/last.pt"))
    assert needle in line and "'/runs/x/last.pt'" in line and "\n" not in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_shows_the_traceback(tmp_path, images, capsys, where):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    argv = train_argv(images, target, "--max-steps", 1)
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    code, err = run_cli(argv, capsys)
    assert code == 1 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("byol-pytorch: error: --out")
