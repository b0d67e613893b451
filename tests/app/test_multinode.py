"""`byol-pytorch train` on two "nodes": two torchrun launchers that meet through a c10d rendezvous.

Each launcher runs one process (``--nnodes 2 --nproc-per-node 1``), so both processes have
``LOCAL_RANK`` 0 and the rendezvous alone decides which one is global rank 0, as on two
machines. The run is stopped by a SIGTERM on the process that is not rank 0 (a preempted
node), resumed by a second pair of launchers, and must end with the weights, bit for bit,
of an uninterrupted torchrun run of the same world size on one node.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from byol_pytorch.training.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
TOTAL = 6  # optimizer steps of the run
STOP_AT = 2  # the step at which the node that is not rank 0 gets SIGTERM
RESUME_FLAGS = ("--workers", "0", "--log-every", "1")  # not part of the run's saved recipe
LAUNCH_TIMEOUT = 150  # seconds a pair of launchers may take before the test fails

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
    ),
    pytest.mark.skipif(sys.platform == "win32", reason="torchrun's c10d rendezvous with process groups: POSIX"),
    pytest.mark.timeout(600),
]

# Runs `python -m byol_pytorch` after arranging a SIGTERM to global rank 1 at step STOP_AT:
# a node preempted in the middle of the run, deterministically.
STOPPER = textwrap.dedent(
    """
    import os, runpy, signal, sys
    from byol_pytorch import BYOL

    original = BYOL.update_moving_average

    def update(self):
        original(self)
        if self._ema_count == int(os.environ["STOP_AT"]) and os.environ["RANK"] == "1":
            signal.raise_signal(signal.SIGTERM)

    BYOL.update_moving_average = update
    sys.argv[0] = "byol_pytorch"
    runpy.run_module("byol_pytorch", run_name="__main__", alter_sys=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), STOP_AT=str(STOP_AT))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)  # a test run itself under torchrun must not leak its group into ours
    return env


def _start(launcher: list[str], program: list[str]) -> subprocess.Popen:
    """One torchrun launcher, in a process group of its own (killed whole by ``_wait``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *launcher, *program],
        env=_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """``(exit code, stdout, stderr)`` of each launcher.

    Launchers still running after ``LAUNCH_TIMEOUT`` (a hung rendezvous or collective)
    are killed with their whole process group, and the test fails instead of CI hanging.
    """
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return results


def _two_nodes(program: list[str], other_node: list[str] | None = None) -> list[subprocess.Popen]:
    """Two launchers of one process each (the second runs ``other_node`` when given), meeting
    at a fresh c10d rendezvous on this machine."""
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    rendezvous += ["--rdzv-endpoint", f"localhost:{_free_port()}", "--rdzv-id", f"byol-test-{uuid.uuid4().hex[:12]}"]
    return [_start(rendezvous, program), _start(rendezvous, other_node or program)]


def _report(results: list[tuple[int, str, str]]) -> str:
    return "\n".join(
        f"--- launcher {i}: exit {code}\n{out[-2000:]}\n{err[-3000:]}" for i, (code, out, err) in enumerate(results)
    )


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_train_stop_and_resume_like_one_uninterrupted_run(tmp_path, tiny_flags, make_messy_folder):
    data = make_messy_folder(tmp_path / "images", good=20)  # 22 files: 5 steps per epoch (2 ranks x 2)
    common = ["train", "--data", str(data), *tiny_flags, "--max-steps", str(TOTAL), "--log-every", "1"]
    common += ["--checkpoint-every", "1"]

    # Two nodes; the one that is not rank 0 is preempted at step STOP_AT. Beside them, the
    # reference: one launcher of two processes (the same world size), never interrupted.
    out = tmp_path / "shared" / "run"  # the --out both nodes see
    reference = tmp_path / "reference"
    script = tmp_path / "stop_at.py"
    script.write_text(STOPPER)
    procs = _two_nodes([str(script), *common, "--out", str(out)])
    single = ["--nnodes", "1", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    procs.append(_start(single, ["-m", "byol_pytorch", *common, "--out", str(reference)]))
    *first, uninterrupted = _wait(procs)
    assert uninterrupted[0] == 0, _report([uninterrupted])
    assert all(code != 0 for code, _, _ in first), _report(first)  # a preempted run is not a success
    assert sum(f"stopped by SIGTERM at step {STOP_AT}" in err for _, _, err in first) == 1, _report(first)
    stopped = load_checkpoint(out / "last.pt")
    assert stopped["step"] == STOP_AT and stopped["world_size"] == 2 and len(stopped["rng"]) == 2
    assert _steps(out) == [1, 2]  # written once, by global rank 0 alone

    # A second pair of launchers resumes from the shared --out and finishes.
    resumed = _wait(_two_nodes(["-m", "byol_pytorch", "train", "--out", str(out), "--resume", *RESUME_FLAGS]))
    assert [code for code, _, _ in resumed] == [0, 0], _report(resumed)
    banners = [line for _, stdout, _ in resumed for line in stdout.splitlines() if "process(es) on cpu" in line]
    assert len(banners) == 1, _report(resumed)  # global rank 0 alone prints, though both have LOCAL_RANK 0
    assert f"steps {STOP_AT} -> {TOTAL}" in banners[0]  # continued from the saved step, not from 0
    assert _steps(out) == list(range(1, TOTAL + 1))

    final, expected = load_checkpoint(out / "last.pt"), load_checkpoint(reference / "last.pt")
    assert final["step"] == expected["step"] == TOTAL and final["world_size"] == 2
    assert int(final["learner"]["ema_step"]) == TOTAL and final["scheduler"]["last_epoch"] == TOTAL
    assert final["learner"].keys() == expected["learner"].keys()
    trained = [n for n, t in final["learner"].items() if not torch.equal(t, stopped["learner"][n])]
    assert trained, "the resumed run changed the weights"
    for name, tensor in expected["learner"].items():
        assert torch.equal(final["learner"][name], tensor), name
    for a, b in zip(final["rng"], expected["rng"]):
        assert torch.equal(a["torch"], b["torch"])  # every rank's augmentation generator, too


def test_nodes_that_do_not_share_their_out_stop_alike_with_one_line(tmp_path):
    # Node A's --out holds a checkpoint, node B's (another machine's disk) none.
    entries = {"step": 2, "epoch": 0, "batch_in_epoch": 2, "total_steps": 6, "learner": {}, "optimizer": {}}
    entries.update(scheduler={}, rng=[], args={"model": "resnet10t"})
    save_checkpoint(tmp_path / "node_a" / "run" / "last.pt", entries)
    (tmp_path / "node_b" / "run").mkdir(parents=True)
    resume = ["-m", "byol_pytorch", "train", "--resume", *RESUME_FLAGS, "--out"]
    nodes = _wait(_two_nodes([*resume, str(tmp_path / "node_a" / "run")], [*resume, str(tmp_path / "node_b" / "run")]))
    lines = []
    for code, _, err in nodes:  # both stop; the line is printed once, by the first process to fail
        assert code != 0, _report(nodes)
        assert "byol_pytorch/" not in err, err  # no traceback
        lines += [line for line in err.splitlines() if "byol-pytorch: error:" in line]
    assert len(lines) == 1, _report(nodes)
    assert (
        "do not find the same checkpoint" in lines[0] and "sees step 2" in lines[0] and "sees no checkpoint" in lines[0]
    )
    assert "must be on a file system they all share" in lines[0]
    assert load_checkpoint(tmp_path / "node_a" / "run" / "last.pt")["step"] == 2  # left as it was
