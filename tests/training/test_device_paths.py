"""The GPU paths, checked without a GPU (issue 26): each defect a first CUDA run would meet, by construction.

Buffers that follow the net's device, the deferred read's event on the copy's own stream (a fake
CUDA event), DDP stopping every rank together and regressing onto rank 0's target (gloo, two
processes), bf16 only where the GPU computes it natively, one host read per fp16 step, the EMA
of a bfloat16 target, DataParallel refused, the torch floor, fused LARS, channels_last views,
and the README's first snippet run as written. ``tests/gpu/`` holds what needs a real GPU.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from conftest import small_cnn
from PIL import Image

from byol_pytorch import BYOL
from byol_pytorch import _host_read as host_read
from byol_pytorch._version_check import require_torch
from byol_pytorch.ema import ema_update_
from byol_pytorch.training import engine as engine_module
from byol_pytorch.training.engine import OptimizerStep, default_precision

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(projection_size=8, projection_hidden_size=16)


# ------------------------------------------------------------------ devices of buffers and inputs
def test_every_tensor_follows_the_nets_device_at_construction_and_after_to():
    learner = BYOL(small_cnn().to("meta"), image_size=16, **SMALL)  # built from a net already "moved"
    tensors = dict(learner.named_parameters()) | dict(learner.named_buffers())
    assert {n: t.device.type for n, t in tensors.items() if t.device.type != "meta"} == {}
    assert learner.ema_step.device.type == "meta" and learner._finite.device.type == "meta"
    back = learner.to_empty(device="cpu")  # and every tensor follows .to()/.to_empty() back
    assert {t.device.type for t in [*back.parameters(), *back.buffers()]} == {"cpu"}


def test_images_on_another_device_than_the_learner_are_one_clear_error():
    learner = BYOL(small_cnn(), image_size=16, **SMALL)
    with pytest.raises(ValueError, match=r"the images are on meta but the learner is on cpu: move them with images.to"):
        learner(torch.empty(2, 3, 16, 16, device="meta"))


# ------------------------------------------------------------------ the deferred read's stream
class _FakeEvent:
    recorded: list = []

    def record(self, stream=None):
        _FakeEvent.recorded.append(stream)

    def query(self):
        return True


class _FakeHost:
    def __init__(self, shape, dtype):
        self.values = [1.0, 0.0]

    def copy_(self, tensor, non_blocking=False):
        assert non_blocking
        return self

    def tolist(self):
        return self.values


class _FakeCudaTensor:
    device = torch.device("cuda", 1)
    shape = (2,)
    dtype = torch.bool


def test_the_deferred_read_records_its_event_on_the_tensors_own_device_and_stream(monkeypatch):
    contexts, streams = [], []

    class Device:
        def __init__(self, device):
            contexts.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def current_stream(device=None):
        streams.append(device)
        return f"stream of {device}"

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(host_read.torch, "empty", lambda shape, dtype, pin_memory: _FakeHost(shape, dtype))
    _FakeEvent.recorded.clear()
    reader = host_read.DeferredRead()
    assert reader.poll(_FakeCudaTensor()) is None  # the first call starts a copy, returns nothing yet
    assert streams == [torch.device("cuda", 1)] and contexts == [torch.device("cuda", 1)]
    assert _FakeEvent.recorded == ["stream of cuda:1"]  # not the current device's (cuda:0) stream
    assert reader.poll(_FakeCudaTensor()) == [1.0, 0.0]  # landed: read, and the next copy started


# ------------------------------------------------------------------ two processes, gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from byol_pytorch.data.sampling import StepBatch
    from byol_pytorch.training.distributed import setup_distributed
    from byol_pytorch.training.engine import DivergedError, Engine, TrainState, prepare_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
    ctx = setup_distributed("cpu")
    report: dict = {"wait_group": ctx.wait_group is not None}
    torch.manual_seed(10 + rank)  # ranks started WITHOUT a shared seed: different initial weights
    learner = BYOL(small_cnn(), image_size=16, **SMALL)
    learner.init_target()  # copied before DDP wraps the learner, as prepare_model does
    model = prepare_model(learner, ctx)
    unused = {n.removeprefix("online_encoder.") for n in learner.unused_parameter_names}  # the classifier: DDP skips it
    online = [p.detach().clone() for n, p in learner.online_encoder.named_parameters() if n not in unused]
    target = [p.detach().clone() for n, p in learner.target_encoder.named_parameters() if n not in unused]
    gathered = [None, None]
    dist.all_gather_object(gathered, [t.sum().item() for t in target])
    report["target_is_own_online"] = all(torch.equal(a, b) for a, b in zip(online, target))
    report["targets_agree"] = gathered[0] == gathered[1]
    ctx.wait_for_main()
    # Rank 1's third batch holds a NaN: every rank must stop at the same step with the same error.
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01)
    batches = []
    for k in range(6):
        x = torch.rand(4, 3, 16, 16)
        if rank == 1 and k == 2:
            x[0, 0, 0, 0] = float("nan")
        batches.append(StepBatch([x], 0, 0, k + 1, 6))
    engine = Engine(OptimizerStep(learner, model, optimizer, None, "fp32", ctx.device), ctx, progress=False)
    try:
        engine.run(iter(batches), TrainState(total=6))
        report["error"] = None
    except DivergedError as error:
        report["error"], report["step"] = str(error), error.step
    report["finite_check_restored"] = learner.finite_check
    torch.save(report, f"{out}/report{rank}.pt")
    ctx.close()


@pytest.fixture(scope="module")
def ddp_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_paths")
    mp.spawn(_ddp_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"report{r}.pt") for r in range(2)]


def test_after_wrapping_every_rank_regresses_onto_rank_0s_target(ddp_reports):
    assert ddp_reports[0]["targets_agree"] and ddp_reports[1]["targets_agree"]
    assert all(r["target_is_own_online"] for r in ddp_reports)  # DDP's broadcast of the online net, the same one


def test_a_non_finite_step_on_one_rank_stops_every_rank_at_the_same_step(ddp_reports):
    errors = [(r["error"], r["step"]) for r in ddp_reports]
    assert errors[0] == errors[1] and errors[0][1] == 3
    assert "a training batch contained NaN or Inf values" in errors[0][0]
    assert all(r["finite_check_restored"] for r in ddp_reports) and all(r["wait_group"] for r in ddp_reports)


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize(
    "capability, expected", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_bf16_is_the_default_only_where_the_gpu_computes_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # true on a T4 / V100 too
    assert default_precision(torch.device("cuda", 0)) == expected
    assert default_precision(torch.device("cpu")) == "fp32"


def test_an_fp16_step_reads_nothing_back_besides_the_scalers_own_check(monkeypatch):
    torch.manual_seed(0)
    learner = BYOL(small_cnn(), image_size=16, **SMALL)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    monkeypatch.setattr(type(scaler), "get_scale", lambda self: pytest.fail("get_scale reads the scale back"))
    step = OptimizerStep(learner, learner, optimizer, None, "fp32", torch.device("cpu"), scaler)
    learner.finite_check = False  # as under the engine, which reads the flags itself
    images = torch.rand(4, 3, 16, 16)
    before = [p.detach().clone() for p in learner.online_predictor.parameters()]
    with torch.no_grad():
        next(learner.online_predictor.parameters()).fill_(1e38)  # the scaled gradients overflow: a skipped step
    start = [p.detach().clone() for p in learner.online_predictor.parameters()]
    _, stepped = step([images])
    assert not stepped and step.skipped == 1 and step.steps == 0 and int(learner.ema_step) == 0
    assert all(torch.equal(a, b) for a, b in zip(start, learner.online_predictor.parameters()))
    with torch.no_grad():
        for p, value in zip(learner.online_predictor.parameters(), before):
            p.copy_(value)
    _, stepped = step([images])  # finite again: a real step, schedules and EMA advance
    assert stepped and step.steps == 1 and int(learner.ema_step) == 1


@pytest.mark.filterwarnings("ignore:update_moving_average\\(\\) was called again")  # EMA steps alone, on purpose
def test_the_ema_of_a_bfloat16_target_moves_like_a_float32_one():
    learner = BYOL(small_cnn(), image_size=16, moving_average_decay=0.996, **SMALL)
    learner.init_target()
    learner.to(torch.bfloat16)
    with torch.no_grad():  # target at 1.0, online at 1.1: each step moves the target by 0.4% of 0.1
        for target, online in zip(learner.target_encoder.parameters(), learner.online_encoder.parameters()):
            target.fill_(1.0)
            online.fill_(1.1)
    plain = [p.detach().clone() for p in learner.target_encoder.parameters()]
    for _ in range(100):
        learner.update_moving_average()
        ema_update_(plain, [p.detach() for p in learner.online_encoder.parameters()], 0.996)
    expected = 1.1 - 0.1 * 0.996**100  # 1.0330, float64
    for t, frozen in zip(learner.target_encoder.parameters(), plain):
        assert t.dtype == torch.bfloat16 and (t.double() - expected).abs().max() <= 2**-7  # bfloat16's step at 1
        assert torch.equal(frozen, torch.ones_like(frozen))  # a bfloat16 lerp alone never leaves 1.0


def test_dataparallel_replicas_are_refused_with_the_fix():
    learner = BYOL(small_cnn(), image_size=16, **SMALL)
    learner._is_replica = True  # what nn.parallel.replicate sets on each GPU's copy
    with pytest.raises(TypeError, match="does not run under nn.DataParallel.*DistributedDataParallel"):
        learner(torch.rand(4, 3, 16, 16))


def test_the_torch_floor_is_checked_at_import_with_the_fix():
    require_torch("2.4.0") is None and require_torch("3.0.1+cpu") is None  # noqa: B015
    with pytest.raises(ImportError, match=r'needs torch >= 2.4, found 2.3.1: pip install -U "torch>=2.4"'):
        require_torch("2.3.1")
    setup = (REPO / "setup.py").read_text()
    assert '"torch>=2.4"' in setup


# ------------------------------------------------------------------ speed by construction
def _count_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def test_lars_costs_a_fixed_number_of_ops_whatever_the_number_of_layers():
    from byol_pytorch.training.optim import LARS

    def ops(layers: int) -> int:
        net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
        optimizer = LARS(net.parameters(), lr=0.1, weight_decay=1e-4)
        net(torch.rand(2, 8)).sum().backward()
        optimizer.step()  # the first creates the momentum buffers
        return _count_ops(optimizer.step)

    assert ops(4) == ops(40)  # the trust ratios of all layers in one vector: no per-weight kernels


def test_channels_last_nets_get_channels_last_views():
    seen = []
    net = small_cnn()
    net[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    learner = BYOL(net, image_size=16, **SMALL)
    learner(torch.rand(4, 3, 16, 16))
    assert seen and not any(seen)  # an NCHW net gets NCHW views
    learner.to(memory_format=torch.channels_last)
    seen.clear()
    learner(torch.rand(4, 3, 16, 16))
    assert seen and all(seen)  # converted once, where the views are made, not in the first conv every call


def test_copies_go_to_a_side_stream_only_on_cuda():
    from byol_pytorch.training.distributed import DistContext

    engine = engine_module.Engine(None, DistContext(), progress=False)  # type: ignore[arg-type]
    moved = engine._to_device([torch.ones(2, 3)])
    assert engine._copy_stream is None and torch.equal(moved[0], torch.ones(2, 3))


# ------------------------------------------------------------------ the README's first snippet
def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "epochs = 100\n" in snippet
    snippet = snippet.replace("epochs = 100\n", "epochs = 1\n")  # one pass over the test's folder
    assert "batch_size=64, workers=4)" in snippet  # a probe: the snippet used a loader it never made
    snippet = snippet.replace("batch_size=64, workers=4)", "batch_size=2, workers=0)")  # two steps of 2 images
    assert 'device = "cuda" if torch.cuda.is_available() else "cpu"' in snippet
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos" / "trip").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(
            tmp_path / "photos" / "trip" / f"{i}.png"
        )
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the documentation's own code
    learner, net = scope["learner"], scope["net"]
    assert int(learner.ema_step) == 2 and (tmp_path / "improved.pt").stat().st_size > 10_000_000
    assert learner.moving_average_total_steps == 2 and learner.current_decay == 1.0  # tau at the end of the run
    saved = torch.load(tmp_path / "improved.pt")
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
