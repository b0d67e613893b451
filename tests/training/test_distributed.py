"""distributed.py and DDP: two processes on the CPU (gloo) hold identical weights and the gradient of the union.

Also the command line under torchrun, and SyncBatchNorm in the heads on GPUs (skipped
without two CUDA devices).
"""

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from conftest import stats_free_learner

from byol_pytorch import BYOL
from byol_pytorch.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_learner() -> BYOL:
    torch.manual_seed(0)  # the same initial weights on every rank
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return BYOL(net, image_size=16, projection_size=8, projection_hidden_size=16)


def _union_batch() -> torch.Tensor:
    return torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from byol_pytorch.data.sampling import EpochSampler
    from byol_pytorch.training.distributed import setup_distributed
    from byol_pytorch.training.engine import OptimizerStep
    from byol_pytorch.training.optim import LARS, param_groups

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    ctx = setup_distributed("cpu")
    assert ctx.distributed and dist.get_backend() == "gloo"

    # 1. Several real steps: BatchNorm, random views drawn per rank, LARS, EMA.
    learner = _bn_learner()
    data = torch.randint(0, 256, (32, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    sampler = EpochSampler(len(data), 4, ctx.rank, ctx.world_size, seed=0)
    torch.manual_seed(100 + rank)  # the augmentations differ per rank
    model = DistributedDataParallel(learner)
    opt = LARS(param_groups(learner, 1e-4), lr=0.5)
    step = OptimizerStep(learner, model, opt, None, "fp32", ctx.device)
    indices = list(sampler)
    for k in range(STEPS):
        step([data[indices[4 * k : 4 * k + 4]]])
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in learner.modules())  # CPU: plain BatchNorm
    torch.save({k: v.clone() for k, v in learner.state_dict().items()}, f"{out}/state{rank}.pt")
    torch.save(indices, f"{out}/indices{rank}.pt")

    # 2. One backward of the shard through DDP: the gradients are the all-reduced mean.
    learner = stats_free_learner()
    model = DistributedDataParallel(learner)
    shard = _union_batch()[rank * 4 : (rank + 1) * 4]
    model(shard).backward()
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    torch.save(grads, f"{out}/grads{rank}.pt")
    ctx.close()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def test_ranks_hold_identical_online_and_target_parameters(ddp_run):
    states = [torch.load(ddp_run / f"state{r}.pt") for r in range(WORLD)]
    fresh = _bn_learner().state_dict()
    params = {n for n, _ in _bn_learner().named_parameters()}
    target_names = [k for k in states[0] if k.startswith("target_encoder.")]
    assert target_names, "the target network was created"
    assert int(states[0]["ema_step"]) == STEPS
    for name, value in states[0].items():
        if "running_" in name or "num_batches" in name:
            continue  # BatchNorm statistics come from each rank's own last forward (the target's too, as in the paper)
        assert torch.equal(value, states[1][name]), name
    trained = [n for n in params if "fc" not in n and not torch.equal(states[0][n], fresh[n])]
    assert trained, "training changed the weights"
    shards = [set(torch.load(ddp_run / f"indices{r}.pt")) for r in range(WORLD)]
    assert not shards[0] & shards[1]  # each rank saw its own images


def test_ddp_gradient_equals_single_process_gradient_of_the_union(ddp_run):
    learner = stats_free_learner()
    learner(_union_batch()).backward()
    single = {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}
    for rank in range(WORLD):
        grads = torch.load(ddp_run / f"grads{rank}.pt")
        assert grads.keys() == single.keys()
        for name, grad in single.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_command_under_torchrun(tmp_path, tiny_flags, make_messy_folder):
    data = make_messy_folder(tmp_path / "images")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "byol_pytorch",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        *tiny_flags,
        "--max-steps",
        "3",
        "--log-every",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 3 and checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])  # seeded per rank
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rank 0 alone writes


def _train_cli_worker(rank: int, port: int, out: str, flags: list[str], die: bool = False) -> None:
    """``byol-pytorch train`` as one torchrun rank, reading ``OUT/node{rank}``'s shards; its exit code and stderr.

    ``die``: every rank reads ``OUT/node0``, and rank 1 is killed (``os._exit``) at its first optimizer step.
    """
    import contextlib
    import io

    from byol_pytorch.app import cli
    from byol_pytorch.training import engine

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    if die and rank == 1:
        engine.OptimizerStep.__call__ = lambda *a: os._exit(0)  # type: ignore[method-assign]
    data = f"{out}/node{0 if die else rank}/train-{{0000..0003}}.tar"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["train", "--data", data, "--out", f"{out}/run", *flags])
    Path(out, f"rank{rank}.json").write_text(json.dumps([code, err.getvalue()]))


def _clean_fails_worker(rank: int, port: int, out: str, flags: list[str]) -> None:
    """``train`` as one torchrun rank whose rank 0 cannot sample the clean images (a UserError there)."""
    from byol_pytorch.app import train
    from byol_pytorch.app.errors import UserError

    if rank == 0:

        def refuse(*args):
            raise UserError("--bn-stats clean: no image could be read")

        def claim_late(ctx, claim=train._claim_error_line):
            time.sleep(2)  # rank 1 claims the run's error line: it prints what it was sent
            return claim(ctx)

        train._clean_images = refuse  # type: ignore[assignment]
        train._claim_error_line = claim_late  # type: ignore[assignment]
    _train_cli_worker(rank, port, out, flags)


def test_a_refusal_on_the_main_rank_alone_is_one_line_whichever_rank_prints(tmp_path, tiny_flags, make_shards):
    """Review: the other ranks got the refusal as a RuntimeError; when one of them printed the run's error line,
    it was a traceback."""
    make_shards(tmp_path / "node0", per_shard=6)
    make_shards(tmp_path / "node1", per_shard=6)
    mp.spawn(_clean_fails_worker, args=(_free_port(), str(tmp_path), [*tiny_flags, "--max-steps", "2"]), nprocs=WORLD)
    codes, errs = zip(*(json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)))
    (line,) = [x for x in "".join(errs).splitlines() if x.strip()]
    assert codes == (1, 1) and line.endswith("--bn-stats clean: no image could be read"), errs


def test_a_killed_peer_before_the_first_checkpoint_is_not_said_to_have_left_one(tmp_path, tiny_flags, make_shards):
    """DDP probe: the survivor's line said 'continue with --resume (the last checkpoint is kept)' where none was
    written, and --resume then failed with 'no checkpoint'."""
    make_shards(tmp_path / "node0", per_shard=6)
    flags = [*tiny_flags, "--max-steps", "4"]
    mp.spawn(_train_cli_worker, args=(_free_port(), str(tmp_path), flags, True), nprocs=WORLD, join=True)
    code, err = json.loads((tmp_path / "rank0.json").read_text())
    assert code == 1 and "lost the connection to another process of this run" in err, err
    assert "then start it again (no checkpoint was written yet)" in err and "--resume" not in err
    assert not (tmp_path / "rank1.json").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_ranks_whose_local_shards_differ_stop_with_one_line(tmp_path, tiny_flags, make_shards):
    """DDP probe: node-local shard copies of other sizes gave the ranks epochs of different lengths, and the run hung
    at the first epoch's end (with --val-data) or trained on mismatched epochs."""
    make_shards(tmp_path / "node0", per_shard=6)
    make_shards(tmp_path / "node1", per_shard=8)
    flags = [*tiny_flags, "--max-steps", "2"]
    mp.spawn(_train_cli_worker, args=(_free_port(), str(tmp_path), flags), nprocs=WORLD, join=True)
    codes, errs = zip(*(json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)))
    (line,) = [x for x in "".join(errs).splitlines() if x.strip()]  # the first process to fail prints, alone
    assert codes == (1, 1) and "the processes do not see the same data: rank 1 counts (8, 8, 8, 8)" in line, line
    assert "where rank 0 counts (6, 6, 6, 6)" in line and "copy it whole to every machine" in line
    assert not (tmp_path / "run" / "last.pt").exists()


def _trainer_order_worker(rank: int, port: int, out: str) -> None:
    """A BYOLTrainer built without a seed, as its docstring's torchrun example: this rank's indices of epoch 0."""
    from byol_pytorch.training.trainer import BYOLTrainer, MockDataset

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.seed()  # each process's own random initial seed, as a fresh interpreter has
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    trainer = BYOLTrainer(
        net, image_size=16, hidden_layer=-1, learning_rate=1e-3, dataset=MockDataset(16, 40), num_train_steps=1,
        batch_size=4, checkpoint_folder=f"{out}/ckpt", byol_kwargs={"projection_size": 8, "projection_hidden_size": 16},
        device="cpu",
    )  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(list(trainer.sampler)))
    trainer.ctx.close()


def test_trainer_ranks_split_each_epoch_without_a_seed(tmp_path):
    """DDP probe: with seed=None each rank shuffled with its own initial seed, so the ranks drew overlapping images
    (9 to 11 of 20 per epoch) and left others out."""
    mp.spawn(_trainer_order_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    orders = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert sorted(orders[0] + orders[1]) == list(range(40))


def _trainer_knn_worker(rank: int, port: int, out: str, val: str) -> None:
    """A BYOLTrainer with a kNN monitor: what ``trainer()`` returns on this rank."""
    from byol_pytorch.training.trainer import BYOLTrainer, MockDataset

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    trainer = BYOLTrainer(
        net, image_size=16, hidden_layer=-1, learning_rate=1e-3, dataset=MockDataset(16, 16), num_train_steps=2,
        batch_size=4, checkpoint_folder=f"{out}/ckpt", byol_kwargs={"projection_size": 8, "projection_hidden_size": 16},
        device="cpu", seed=0, val_data=val, val_every=1,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a kNN below the untouched net's, on 2 steps
        result = trainer()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"result": result, "knn": trainer.knn}))
    trainer.ctx.close()


def test_the_trainers_knn_figures_reach_every_rank(tmp_path, make_labelled):
    """Multi-process probe: with val_data, rank 0's result had "knn" and "knn_reference" and rank 1's did not (its
    docstring promised them): code reading them on every rank raised KeyError on rank 1."""
    val = make_labelled(tmp_path / "val", classes=2, per_class=5)
    mp.spawn(_trainer_knn_worker, args=(_free_port(), str(tmp_path), str(val)), nprocs=WORLD, join=True)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert first == second and [step for step, _ in first["knn"]] == [0, 1, 2]
    assert first["result"]["knn"] == first["knn"][-1][1] and first["result"]["knn_reference"] == first["knn"][0][1]


def _own_ddp_loop_worker(rank: int, port: int, out: str) -> None:
    """The README's own DDP loop, each rank's net initialised with its own seed: lazy target, then an early one."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    targets = []
    for early in (False, True):
        torch.manual_seed(rank)  # other initial weights on every rank
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        learner = BYOL(net, image_size=16, hidden_layer=-1, projection_size=8, projection_hidden_size=16)
        if early:
            learner.init_target()
        model = DistributedDataParallel(learner)
        if early:
            learner.broadcast_target()
        opt = torch.optim.SGD(learner.parameters(), lr=0.1)
        model(torch.rand(4, 3, 16, 16)).backward()
        opt.step()
        learner.update_moving_average()
        targets.append([p.detach().clone() for p in learner.target_encoder.parameters()])
    torch.save(targets, f"{out}/targets{rank}.pt")
    dist.destroy_process_group()


def test_the_readmes_own_ddp_loop_keeps_one_target_on_every_rank(tmp_path):
    """DDP probe: init_target() before DDP, as its docstring said, on nets seeded per rank left each rank its own
    target; the README now says when to call broadcast_target(), and the lazy copy needs nothing."""
    mp.spawn(_own_ddp_loop_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    first, second = (torch.load(tmp_path / f"targets{r}.pt") for r in range(WORLD))
    for lazy_or_early in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first[lazy_or_early], second[lazy_or_early]))


def _slow_main_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 works alone for longer than the default group's timeout; the others wait for its result."""
    import datetime
    import time

    import torch.distributed as dist

    from byol_pytorch.training.distributed import DistContext, broadcast_from_main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=2))
    wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))  # setup_distributed's
    ctx = DistContext(rank, WORLD, rank, torch.device("cpu"), True, wait_group)
    result = broadcast_from_main(ctx, lambda: time.sleep(4) or "counted")  # as counting remote shards
    Path(out, f"rank{rank}.txt").write_text(result)
    ctx.close()


def test_ranks_wait_for_the_main_ranks_lone_work_past_the_default_timeout(tmp_path):
    """Before: the broadcast ran on the default group, whose watchdog (NCCL's 10 minutes; 2 s here) killed the
    waiting ranks while rank 0 counted remote shards or scanned a large folder."""
    mp.spawn(_slow_main_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)] == ["counted"] * WORLD


def _sync_bn_worker(rank: int, port: int, out: str) -> None:
    """One rank: build the learner, create the group, take a step; record what the modules became."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpus = torch.cuda.device_count()
    device = torch.device("cuda", rank % gpus)
    torch.cuda.set_device(device)
    learner = _bn_learner().to(device)  # built before the group exists (as under Lightning/accelerate)
    seen = {"sync_before_group": any(isinstance(m, nn.SyncBatchNorm) for m in learner.modules())}
    # NCCL needs one GPU per rank; on a one-GPU box gloo holds the group (the conversion is the same).
    dist.init_process_group("nccl" if gpus >= WORLD else "gloo", rank=rank, world_size=WORLD)
    images = torch.rand(4, 3, 16, 16, device=device)
    if gpus >= WORLD:
        learner(images).backward()  # a real synchronised training step
    else:
        learner.eval()  # eval-mode BatchNorm: no collective needed on the shared GPU
        learner(images)
    seen.update(
        sync_projector=any(isinstance(m, nn.SyncBatchNorm) for m in learner.online_encoder.projector.modules()),
        sync_predictor=any(isinstance(m, nn.SyncBatchNorm) for m in learner.online_predictor.modules()),
        plain_bn_predictor=any(type(m) is nn.BatchNorm1d for m in learner.online_predictor.modules()),
        plain_bn_backbone=any(type(m) is nn.BatchNorm2d for m in learner.net.modules()),
    )
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm is CUDA-only in PyTorch")
def test_heads_use_sync_batchnorm_when_a_gpu_group_exists(tmp_path):
    mp.spawn(_sync_bn_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not seen["sync_before_group"], seen
        assert seen["sync_projector"] and seen["sync_predictor"], seen
        assert not seen["plain_bn_predictor"], seen
        assert seen["plain_bn_backbone"], seen  # the backbone only on request


# ---------------------------------------------------------------- one process
def test_setup_distributed_without_torchrun_runs_alone_on_the_cpu(monkeypatch):
    import torch.distributed as dist

    from byol_pytorch.training.distributed import gather_objects, setup_distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    ctx = setup_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device) == (0, 1, 0, torch.device("cpu"))
    assert not ctx.distributed and ctx.is_main and not ctx.owns_group
    ctx.barrier()  # no group: nothing to wait for
    ctx.close()
    assert not dist.is_initialized()
    assert gather_objects(ctx, {"knn": 0.5}) == [{"knn": 0.5}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_distributed(None).device == torch.device("cpu")  # the default without a GPU


def test_setup_distributed_asked_for_cuda_without_cuda(monkeypatch):
    from byol_pytorch.training.distributed import setup_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda was given but CUDA is not available; use --device cpu"):
        setup_distributed("cuda")


def test_each_process_takes_its_local_gpu_or_the_one_its_launcher_left_it():
    """Before: cuda:LOCAL_RANK always, an 'invalid device ordinal' under launchers that give each process its own
    single visible GPU (SLURM's --gpus-per-task=1)."""
    from byol_pytorch.training.distributed import local_gpu

    assert [local_gpu(rank, 4) for rank in range(4)] == [torch.device("cuda", r) for r in range(4)]
    assert local_gpu(3, 1) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"LOCAL_RANK is 2 but this process sees 2 GPU\(s\).*--nproc_per_node=2"):
        local_gpu(2, 2)
    assert local_gpu(1, 2, local_world=2) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"2 processes on this machine share 1 GPU\(s\).*--nproc_per_node=1"):
        local_gpu(1, 1, local_world=2)  # review: torchrun on a one-GPU machine binds nothing; NCCL would refuse
