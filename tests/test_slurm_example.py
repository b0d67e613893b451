"""examples/slurm_multinode.sh: the command it hands srun, run with stand-ins for SLURM's tools.

The stand-in ``srun`` writes its arguments to a file instead of starting anything; the test
checks the torchrun launcher's flags and that ``byol-pytorch train`` accepts the rest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from byol_pytorch.app.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "slurm_multinode.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _submit(tmp_path: Path, out: Path) -> list[str]:
    """Run the script as sbatch would on the first node; the arguments it gave srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/bin/sh\nprintf "gpu-node-07\\ngpu-node-08\\n"\n')
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path / "srun_args"}"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="4",
        DATA=str(tmp_path / "images"),
        OUT=str(out),
    )
    subprocess.run(["bash", str(SCRIPT)], env=env, check=True, timeout=60)
    return (tmp_path / "srun_args").read_text().splitlines()


def test_slurm_script_launches_one_torchrun_per_node_with_a_shared_out(tmp_path):
    out = tmp_path / "shared" / "run"
    args = _submit(tmp_path, out)
    assert args[:3] == ["--kill-on-bad-exit=1", "python", "-m"] and args[3] == "torch.distributed.run"
    launcher = args[4 : args.index("-m", 4)]
    flags = dict(zip(launcher[::2], launcher[1::2]))
    assert flags == {
        "--nnodes": "2",
        "--nproc-per-node": "4",
        "--rdzv-backend": "c10d",
        "--rdzv-endpoint": "gpu-node-07:29500",  # the first node of the job
        "--rdzv-id": "4242",
    }
    command = args[args.index("-m", 4) + 1 :]
    assert command[0] == "byol_pytorch"
    parsed = build_parser().parse_args(command[1:])  # every flag is one of `train`'s
    assert parsed.command == "train" and parsed.out == str(out) and parsed.data == str(tmp_path / "images")
    assert parsed.resume is None  # a new run

    out.mkdir(parents=True)
    (out / "last.pt").write_bytes(b"a checkpoint")
    resumed = build_parser().parse_args(_submit(tmp_path, out)[args.index("-m", 4) + 2 :])
    assert resumed.resume is True  # the next job continues the run
