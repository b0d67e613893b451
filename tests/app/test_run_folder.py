"""Issue 23: one run per run folder, a refused start changes nothing, one error line under torchrun, out of memory."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from byol_pytorch import BYOL
from byol_pytorch.app import cli
from byol_pytorch.app.runlock import LOCK_NAME, RunFolderLock
from byol_pytorch.training.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300


def env() -> dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        environment.pop(name, None)
    return environment


def train_process(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "byol_pytorch", "train", *argv],
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def holder_written(out: Path) -> bool:
    lock = out / LOCK_NAME
    return lock.is_file() and lock.read_text().strip().endswith("}")


def error_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if "byol-pytorch: error:" in line]


def snapshot(folder: Path) -> dict[str, tuple[int, str]] | None:
    """Every file under ``folder``: (size, sha256); None when the folder does not exist."""
    if not folder.exists():
        return None
    return {
        str(path.relative_to(folder)): (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def learner_and_steps(out: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timeless = [{k: v for k, v in row.items() if k not in ("img_per_s", "time_s")} for row in rows]
    return load_checkpoint(out / "last.pt")["learner"], timeless


# ------------------------------------------------------------------------- the lock


def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_is_unharmed(
    messy, tmp_path, tiny_flags, record_fault
):
    common = ["--data", str(messy), *tiny_flags, "--max-steps", "48", "--log-every", "1", "--checkpoint-every", "8"]
    alone = tmp_path / "alone"
    solo = train_process([*common, "--out", str(alone)])
    assert solo.wait(TIMEOUT) == 0, solo.communicate()

    shared = tmp_path / "shared"
    first = train_process([*common, "--out", str(shared)])
    wait_for(lambda: holder_written(shared), first, "the first run took the lock")
    second = train_process([*common, "--out", str(shared)])
    _, err = second.communicate(timeout=TIMEOUT)
    assert second.returncode == 1
    (line,) = error_lines(err)
    assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    assert f"the run folder {shared} is in use by another run (pid {first.pid} on host {socket.gethostname()}" in line
    assert "choose another --out" in line and "Traceback" not in err
    out, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, err

    weights, rows = learner_and_steps(shared)
    reference_weights, reference_rows = learner_and_steps(alone)
    assert rows == reference_rows and [r["step"] for r in rows] == list(range(1, 49))  # every step once
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        assert torch.equal(weights[name], value), name  # bitwise the run alone
    record_fault(
        "a second train on a run folder in use",
        1,
        "refused in one line naming the holder (pid, host, start); the first run bitwise equal to a run alone",
    )


def test_kill_9_of_the_holder_leaves_no_stale_lock(messy, tmp_path, tiny_flags, record_fault):
    out = tmp_path / "run"
    argv = ["--data", str(messy), *tiny_flags, "--max-steps", "100000", "--checkpoint-every", "1", "--out", str(out)]
    holder = train_process(argv)
    wait_for(lambda: (out / "last.pt").is_file() and holder_written(out), holder, "a checkpoint")
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=TIMEOUT)
    step = load_checkpoint(out / "last.pt")["step"]
    code = cli.main(["train", "--out", str(out), "--resume", "--max-steps", str(step + 1), "--workers", "0"])
    assert code == 0 and load_checkpoint(out / "last.pt")["step"] == step + 1
    assert f'"pid": {os.getpid()}' in (out / LOCK_NAME).read_text()  # the new holder's line
    record_fault("SIGKILL of the run folder's lock holder, then --resume", 1, "no stale lock: the next run took it")


def test_one_process_cannot_run_twice_on_a_folder(tmp_path):
    first = RunFolderLock(tmp_path / "run")
    first.acquire(create=True)
    try:
        with pytest.raises(cli.UserError, match=r"is in use by another run \(pid \d+ on host .*: this process\)"):
            RunFolderLock(tmp_path / "run").acquire(create=True)
    finally:
        first.release()
    again = RunFolderLock(tmp_path / "run")
    again.acquire(create=True)  # released: free again
    again.release()


def _refuse() -> None:
    raise cli.UserError("--wandb: W&B could not start")


def test_a_first_start_refused_under_the_lock_takes_back_its_folders_and_lock_file(tmp_path, record_fault):
    """Before: W&B refusing a first start (it opens once the lock is held) left the new folder and RUNDIR/.lock."""
    (tmp_path / "kept").mkdir()
    lock = RunFolderLock(tmp_path / "kept" / "new" / "run")
    with pytest.raises(cli.UserError, match="W&B could not start"):
        lock.acquire(create=True, check=_refuse)
    assert [path.name for path in tmp_path.rglob("*")] == ["kept"] and not lock.held
    again = RunFolderLock(tmp_path / "kept" / "new" / "run")
    again.acquire(create=True)  # nothing held behind
    assert f'"pid": {os.getpid()}' in again.path.read_text()
    again.release()
    record_fault("a first start refused once the lock is held (W&B, TensorBoard)", 1, "no folder, no .lock left")


def test_a_refusal_under_the_lock_keeps_a_lock_file_it_did_not_create(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("the last holder\n")
    with pytest.raises(cli.UserError, match="W&B could not start"):
        RunFolderLock(out).acquire(create=True, check=_refuse)
    assert [path.name for path in out.iterdir()] == [LOCK_NAME]
    assert (out / LOCK_NAME).read_text() == "the last holder\n"


def test_a_lock_file_removed_between_open_and_lock_is_taken_again(tmp_path, monkeypatch):
    """A taker that opened the file a refused first start then removed must not hold the removed file."""
    from byol_pytorch.app import runlock

    real_open, calls = os.open, []

    def open_then_removed(path, flags, *mode):
        fd = real_open(path, flags, *mode)
        calls.append(path)
        if len(calls) == 1:
            os.unlink(path)  # the other start's take-back, between our open and our lock
        return fd

    monkeypatch.setattr(runlock.os, "open", open_then_removed)
    lock = RunFolderLock(tmp_path / "run")
    lock.acquire(create=True)
    try:
        assert len(calls) == 2 and lock.path.is_file()
        assert os.fstat(lock.fd).st_ino == os.stat(lock.path).st_ino  # the lock is on the file at the path
        assert f'"pid": {os.getpid()}' in lock.path.read_text()
    finally:
        lock.release()


def test_export_eval_and_embed_read_a_folder_being_written(messy, tmp_path, tiny_flags, make_labelled, record_fault):
    labelled = make_labelled(tmp_path / "labelled", per_class=5)
    out = tmp_path / "run"
    argv = ["--data", str(messy), *tiny_flags, "--max-steps", "100000", "--checkpoint-every", "1", "--out", str(out)]
    writer = train_process(argv)
    try:
        wait_for(lambda: (out / "last.pt").is_file(), writer, "a checkpoint")
        for round_ in range(2):  # while last.pt is replaced every step
            exported = tmp_path / f"b{round_}.safetensors"
            assert cli.main(["export", str(out / "last.pt"), "--out", str(exported)]) == 0
            assert cli.main(["eval", "--data", str(labelled), "--checkpoint", str(out / "last.pt"), "--knn"]) == 0
            embedded = tmp_path / f"emb{round_}"
            assert (
                cli.main(["embed", "--data", str(messy), "--checkpoint", str(out / "last.pt"), "--out", str(embedded)])
                == 0
            )
        assert writer.poll() is None
        record_fault(
            "export, eval, embed of a run folder being written (last.pt replaced every step)",
            6,
            "all read a complete checkpoint",
        )
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.communicate(timeout=TIMEOUT)


# ------------------------------------------------------------------ a refused start


@pytest.fixture
def finished_run(messy, tmp_path, tiny_flags) -> Path:
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--max-steps", "2"]) == 0
    (out / "file_index.npz").unlink()  # the data looks new: a start would scan it and cache the index
    return out


def _heads_that_do_not_fit(out: Path, tmp_path: Path) -> list[str]:
    checkpoint = load_checkpoint(out / "last.pt")
    checkpoint["args"]["projection_size"] = 64  # the recipe says 64, the weights are 32
    path = tmp_path / "foreign.pt"
    save_checkpoint(path, checkpoint)
    return ["--resume", str(path)]


REFUSALS = {
    "a changed recipe": lambda out, tmp, data: ["--resume", "--projection-size", "64"],
    "heads that do not fit the checkpoint's recipe": lambda out, tmp, data: _heads_that_do_not_fit(out, tmp),
    "a new run over a checkpoint": lambda out, tmp, data: ["--data", str(data), "--model", "resnet10t"],
    "missing data": lambda out, tmp, data: ["--resume", "--data", str(tmp / "nowhere")],
    "an interval of zero": lambda out, tmp, data: ["--resume", "--val-every", "0"],
    "a batch of one": lambda out, tmp, data: ["--resume", "--max-steps", "4", "--batch-size", "1"],
    "a file that is not a checkpoint": lambda out, tmp, data: ["--resume", str(data / "img_0.png")],
    "a model that does not exist": lambda out, tmp, data: ["--resume", "--model", "no_such_net"],
    "another run's checkpoint over this one": lambda out, tmp, data: ["--resume", _copy(out / "last.pt", tmp)],
    "validation data that is not there": lambda out, tmp, data: [
        "--resume",
        "--max-steps",
        "4",
        "--val-data",
        str(tmp / "nowhere"),
    ],
    "a device that does not exist": lambda out, tmp, data: ["--resume", "--device", "bogus"],
}


def _copy(path: Path, tmp_path: Path) -> str:
    """Another run's checkpoint: this one's, as if written for another run folder."""
    checkpoint = load_checkpoint(path)
    checkpoint["args"]["out"] = str(tmp_path / "another_run")
    copy = tmp_path / "other_run.pt"
    save_checkpoint(copy, checkpoint)
    return str(copy)


@pytest.mark.parametrize("reason", sorted(REFUSALS))
def test_a_refused_start_leaves_the_run_folder_byte_identical(
    finished_run, messy, tmp_path, capsys, reason, record_fault
):
    extra = REFUSALS[reason](finished_run, tmp_path, messy)
    before = snapshot(finished_run)
    code = cli.main(["train", "--out", str(finished_run), "--workers", "0", *extra])
    err = capsys.readouterr().err
    assert code in (1, 2) and len(error_lines(err)) == 1, err
    assert snapshot(finished_run) == before
    record_fault(REFUSED, 1, HELD)


def _wandb_that_cannot_start(monkeypatch) -> list[str]:
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    return ["--wandb"]


def _tensorboard_missing(monkeypatch) -> list[str]:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    return ["--tensorboard"]


SINK_REFUSALS = {
    "a W&B run that cannot start": (_wandb_that_cannot_start, "--wandb: W&B could not start"),
    "TensorBoard not installed": (_tensorboard_missing, "--tensorboard needs the tensorboard package"),
}


@pytest.mark.parametrize("reason", sorted(SINK_REFUSALS))
def test_a_logger_that_cannot_start_leaves_the_run_folder_byte_identical(
    finished_run, capsys, monkeypatch, reason, record_fault
):
    """Before: metrics.jsonl rewritten, wandb_run_id and the data's index written, then the refusal."""
    make_flags, message = SINK_REFUSALS[reason]
    flags = make_flags(monkeypatch)
    before = snapshot(finished_run)
    code = cli.main(["train", "--out", str(finished_run), "--resume", "--max-steps", "4", "--workers", "0", *flags])
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and message in lines[0], lines
    assert snapshot(finished_run) == before
    record_fault(REFUSED, 1, HELD)


REFUSED = (
    "a refused start: recipe changed, heads unlike the recipe, new run over a checkpoint, data missing, "
    "bad flags, not a checkpoint, unknown model, folder locked"
)
HELD = "one line; the run folder byte-identical (names, sizes, sha256), the folder index not cached"


FIRST_START_REFUSALS = {
    "a negative lr": (["--lr", "-1"], "--lr must be a positive finite number"),
    "a batch of 0 (its default lr was blamed)": (["--batch-size", "0"], "--batch-size 0 cannot be split"),
    "an empty --out (it was the current folder)": (["--out", ""], "--out is empty; name the run folder"),
    "a negative batch": (["--batch-size", "-8"], "--batch-size -8 cannot be split"),
    "a NaN lr": (["--lr", "nan"], "--lr must be a positive finite number"),
    "an infinite lr": (["--lr", "inf"], "--lr must be a positive finite number"),
    "a negative weight decay": (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    "a negative warm-up": (["--warmup-epochs", "-1"], "--warmup-epochs must be a finite number >= 0"),
    "a device name that is none": (["--device", "bogus"], "--device 'bogus' is not a device name"),
    "validation data that is not there": (["--val-data", "{tmp}/nowhere"], "--val-data: "),
    "a junk file to resume": (["--resume", "{tmp}/junk.pt"], "junk.pt' is not a byol_pytorch checkpoint"),
}


@pytest.mark.parametrize("reason", sorted(FIRST_START_REFUSALS))
def test_a_refused_first_start_creates_no_folder(messy, tmp_path, capsys, tiny_flags, record_fault, reason):
    (tmp_path / "junk.pt").write_bytes(b"hello\n")  # reaches the weights-only unpickler's KeyError
    flags, message = FIRST_START_REFUSALS[reason]
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    out = tmp_path / "new" / "run"
    assert cli.main(["train", "--data", str(messy), "--out", str(out), *tiny_flags, *flags]) in (1, 2)
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "new").exists()
    record_fault("a refused first start (no run folder yet)", 1, "one line; no folder created")


def test_a_fifo_where_the_checkpoint_goes_is_named_with_or_without_resume(messy, tmp_path, capsys, tiny_flags):
    """Before: without --resume 'already exists; pass --resume', with it 'no checkpoint; train without --resume'."""
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / "last.pt")
    for again in ([], ["--resume"]):
        assert cli.main(["train", "--data", str(messy), "--out", str(out), *tiny_flags, *again]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [
            f"byol-pytorch: error: {out / 'last.pt'} is not a checkpoint file but a special file (a FIFO, a socket, "
            "a device); remove it, or choose another --out"
        ]
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]


def test_a_start_refused_by_the_lock_leaves_the_folder_byte_identical(finished_run, tmp_path, record_fault):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from byol_pytorch.app.runlock import RunFolderLock as L; l = L({str(finished_run)!r}); "
            "l.acquire(create=True); print('held', flush=True); input()",
        ],
        env=env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(finished_run)
        refused = train_process(["--out", str(finished_run), "--resume", "--max-steps", "4", "--workers", "0"])
        _, err = refused.communicate(timeout=TIMEOUT)
        assert refused.returncode == 1 and len(error_lines(err)) == 1 and f"pid {holder.pid}" in err
        assert snapshot(finished_run) == before
        record_fault(REFUSED, 1, HELD)
    finally:
        holder.communicate("\n", timeout=TIMEOUT)


# ------------------------------------------------------------------------ torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failure", ["on every process", "on one process"])
def test_a_failure_under_torchrun_prints_one_error_line(messy, tmp_path, tiny_flags, failure, record_fault):
    out = tmp_path / "run"
    argv = ["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--max-steps", "4"]
    program = ["-m", "byol_pytorch", *argv]
    if failure == "on every process":
        program += ["--projection-size", "0"]  # refused on both
    else:  # rank 1 runs out of memory at its second step; rank 0 then loses its peer
        script = tmp_path / "oom_on_rank_1.py"
        script.write_text(
            "import os, runpy, sys, torch\n"
            "from byol_pytorch import BYOL\n"
            "original = BYOL.forward\n"
            "def forward(self, *a, **k):\n"
            "    if os.environ['RANK'] == '1' and self._ema_count == 1:\n"
            "        torch.empty(1 << 50, dtype=torch.uint8)  # the CPU allocator's own error\n"
            "    return original(self, *a, **k)\n"
            "BYOL.forward = forward\n"
            "sys.argv[0] = 'byol_pytorch'\n"
            "runpy.run_module('byol_pytorch', run_name='__main__', alter_sys=True)\n"
        )
        program = [str(script), *argv]
    launcher = ["--nnodes", "1", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *launcher, *program],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode != 0
    lines = error_lines(proc.stderr + proc.stdout)
    assert len(lines) == 1, proc.stderr
    if failure == "on one process":
        assert "process 1 of 2: out of memory on cpu at step 2" in lines[0]
    record_fault("torchrun, 2 processes: a start refused on both; rank 1 out of memory", 1, "1 error line in all")


# --------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_out_of_memory_ends_in_one_line_with_the_fix(
    messy, tmp_path, capsys, monkeypatch, tiny_flags, kind, record_fault
):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(messy), "--out", str(out), *tiny_flags, "--max-steps", "2"]) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    original = BYOL.forward

    def forward(self, *args, **kwargs):
        if self._ema_count == 3:
            if kind == "cuda":  # what the CUDA caching allocator raises (no GPU needed to raise it)
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity"
                )
            torch.empty(1 << 50, dtype=torch.uint8)  # the CPU allocator's real error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BYOL, "forward", forward)
    code = cli.main(
        ["train", "--out", str(out), "--resume", "--max-steps", "6", "--checkpoint-every", "1", "--workers", "0"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "out of memory on cpu at step 4: batch size 4 (4 images per process and pass" in line
    assert "image size 32" in line and "(step 3) is kept" in line
    for fix in ("--resume --precision bf16 --channels-last", "--accumulate 2", "--batch-size 2", "--image-size"):
        assert fix in line
    assert load_checkpoint(out / "last.pt")["step"] == 3 and (out / "last.pt").read_bytes() != before
    record_fault(
        "out of memory in the step (CUDA's OutOfMemoryError raised; the CPU allocator's real error)",
        1,
        "one line: batch and image size, the fixes; the last checkpoint kept",
    )


def test_another_folders_checkpoint_resumed_here_names_this_folders_older_rows(finished_run, messy, tmp_path, capsys):
    """A probe: a folder left by a run killed before its first checkpoint (rows of steps 1-5, no last.pt), then
    --resume OTHER/last.pt into it, logged [1, 2, 3, 4, 5, 61, 62] without a word. The rows up to the checkpoint's
    step stay (they may be this run's own history, its last.pt moved aside), and the run says so."""
    import json

    out = tmp_path / "stale"
    out.mkdir()
    stale = [{"step": s, "loss": 9.0} for s in range(1, 6)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in stale))
    argv = ["train", "--out", str(out), "--resume", str(finished_run / "last.pt"), "--max-steps", "4"]
    assert cli.main([*argv, "--data", str(messy), "--workers", "0", "--log-every", "1"]) == 0
    assert f"holds rows from before this run, which resumes {finished_run / 'last.pt'}" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and load_checkpoint(out / "last.pt")["step"] == 4
    capsys.readouterr()
    again = ["train", "--out", str(out), "--resume", "--max-steps", "5", "--workers", "0", "--log-every", "1"]
    assert cli.main(again) == 0 and "holds rows from before" not in capsys.readouterr().err  # its own rows now
