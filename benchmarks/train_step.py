"""One BYOL training step: images/s and peak memory of ours, the peer and the bare-backbone floor.

A training step is: both views, the forward of the online and the target networks, the
loss, backward, the optimizer step (Adam, lr 1e-3, the same for every contender) and the
EMA update of the target. The contenders see the same batch of B uint8 images:

* ``floor``: the same forward/backward work with no BYOL at all: one forward + backward of
  the backbone on the 2B images of both views concatenated (prepared once, untimed), one
  no-grad forward on them, and the optimizer's step. No augmentation, heads or EMA.
* ``ours``: ``byol_pytorch.BYOL`` with its defaults; it takes the uint8 batch as it is.
* ``ours, views in one batch``: ``BYOL(..., views_in_one_batch=True)``, the opt-in that
  forwards both views as one batch of 2B (one pass per network, BatchNorm statistics over
  both views, as the peer does) instead of the paper's one pass per view.
* ``ours, engine (the CLI's step)``: ours driven by ``byol_pytorch.training.engine`` as ``byol-pytorch
  train`` drives it (``OptimizerStep`` + ``Engine.run`` with hooks, the loss read back each
  step on the CPU): what the command's loop costs around the learner.
* ``peer vanilla`` / ``peer defaults``: lucidrains/byol-pytorch 0.9.1 (see ``benchmarks/common/peer.py``)
  with ``use_simplicial_embeddings=False`` / its defaults; it takes float input in [0, 1],
  so its step includes ``x.float() / 255``.

Our overhead over the floor is split by timing each part alone, in the same rounds:
``per-view forwards`` (the floor's work done as two batches of B, BatchNorm statistics per
view as in the paper, minus the floor), ``views`` (the two augmentations), ``heads``
(projector and predictor forward/backward on both views' (B, D) features, the target
projector, the loss and Adam on the head parameters, on copies of the heads) and ``ema``
(``update_moving_average()``).

Timed steps alternate between the contenders (A B C D ... A B C D ...) after untimed
warm-up steps; the table gives the median. Images/s counts source images (B per step, each
giving two views). Peak memory is the contender's resident state at the step's start
(parameters, buffers, optimizer state, input) plus the step's peak of newly allocated
bytes: ``torch.cuda.max_memory_allocated`` on a GPU, the allocator's running total recorded
by ``torch.profiler(profile_memory=True)`` on the CPU.

    python -m benchmarks.train_step                     # CPU: resnet18, 64 px, batch 32
    python -m benchmarks.train_step --device cuda       # GPU: resnet50, 224 px, batch 256, bf16,
                                                        # channels_last, eager and torch.compile
    python -m benchmarks.train_step --smoke             # tiny sizes, seconds
    python -m benchmarks.train_step --out benchmarks/results/train_step.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from benchmarks.common import peer as bench_peer
from benchmarks.common.contenders import unit_float
from benchmarks.common.data import random_images
from benchmarks.common.machine import machine
from benchmarks.common.report import markdown_table, ms, verdict, write_results
from benchmarks.common.runner import Timings, device_sync, time_alternating
from byol_pytorch import BYOL, BYOLAugment
from byol_pytorch.data.sampling import StepBatch
from byol_pytorch.losses import byol_loss
from byol_pytorch.training.distributed import DistContext
from byol_pytorch.training.engine import Engine, OptimizerStep, Periodic, TrainState, prepare_model

# Goals of issue 6 (time per step relative to the floor; images/s relative to the peer).
CPU_FLOOR_GOAL, GPU_FLOOR_GOAL, GPU_PEER_GOAL = 1.15, 1.08, 1.3
# The flags left unset take their value from a preset: the smoke sizes, the GPU's or the CPU's.
PRESET_FIELDS = ("arch", "image_size", "batch_size", "amp", "channels_last", "modes", "steps", "warmup")
PRESETS = {
    "smoke": ("resnet18", 32, 4, "none", False, "eager", 2, 1),
    "gpu": ("resnet50", 224, 256, "bf16", True, "eager,compile", 30, 5),
    "cpu": ("resnet18", 64, 32, "none", False, "eager", 15, 2),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available); picks the preset below",
    )
    parser.add_argument("--arch", default=None, help="torchvision model (preset: resnet18 on CPU, resnet50 on GPU)")
    parser.add_argument("--image-size", type=int, default=None, help="view side in pixels (preset: 64 CPU, 224 GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (preset: 32 CPU, 256 GPU)")
    parser.add_argument(
        "--amp", choices=["none", "bf16"], default=None, help="autocast dtype (preset: none on CPU, bf16 on GPU)"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (preset: off on CPU, on on GPU)",
    )
    parser.add_argument(
        "--modes", default=None, help="comma list of eager,compile (preset: eager on CPU, eager,compile on GPU)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender (preset: 15 CPU, 30 GPU)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per contender first (preset: 2 CPU, 5 GPU; compile happens here)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=None,
        help="the time that images/s, ratios and goals use: wall clock, or the process's CPU "
        "time, which other jobs on a shared machine barely disturb (with --threads 1 it "
        "is the work done). Default: cpu on the CPU, wall on a GPU; both are shown",
    )
    parser.add_argument("--no-peer", action="store_true", help="leave the peer out")
    parser.add_argument("--no-parts", action="store_true", help="leave out the split of our overhead")
    parser.add_argument(
        "--no-one-batch", action="store_true", help="leave out ours with views_in_one_batch=True (the opt-in)"
    )
    parser.add_argument("--no-engine", action="store_true", help="leave out ours driven by the CLI's engine")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own, the core count); 1 is steadier "
        "on a machine shared with other jobs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="resnet18, 32 px, batch 4, 2 steps, 1 thread: runs in seconds"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the tables, machine and command here")
    parser.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    return parser


@dataclass
class Config:
    """The resolved settings of one run."""

    device: torch.device
    arch: str
    image_size: int
    batch_size: int
    amp: torch.dtype | None
    channels_last: bool
    modes: list[str]
    steps: int
    warmup: int
    clock: str


def resolve_config(args: argparse.Namespace) -> Config:
    """Fill the flags left unset from the CPU / GPU preset (or the smoke sizes)."""
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = dict(zip(PRESET_FIELDS, PRESETS["smoke" if args.smoke else "gpu" if gpu else "cpu"]))
    value = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in preset}
    modes = [m.strip() for m in value["modes"].split(",") if m.strip()]
    if not modes or any(m not in ("eager", "compile") for m in modes):
        raise ValueError(f"--modes must be a comma list of eager and compile, got {value['modes']!r}")
    return Config(
        device,
        value["arch"],
        value["image_size"],
        value["batch_size"],
        torch.bfloat16 if value["amp"] == "bf16" else None,
        bool(value["channels_last"]),
        modes,
        value["steps"],
        value["warmup"],
        args.clock or ("wall" if gpu else "cpu"),
    )


@dataclass
class Contender:
    """A named training step (or part of one) and what it holds in memory."""

    name: str
    step: Callable[[], None]
    kind: str = "step"  # "step" (a row of the main table) or "part" (a row of the split)
    mode: str = "eager"
    modules: list[nn.Module] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)  # wall-clock and process CPU seconds per step
    peak_bytes: int | None = None
    note: str = ""


def make_net(cfg: Config) -> nn.Module:
    """A randomly initialised torchvision backbone on the device, in the chosen memory format."""
    net = getattr(torchvision.models, cfg.arch)().to(cfg.device)
    return net.to(memory_format=torch.channels_last) if cfg.channels_last else net


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    """The same optimizer for every contender: Adam, lr 1e-3 (fused kernels on a GPU)."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.Adam(params, lr=1e-3, fused=True if cfg.device.type == "cuda" else None)


def autocast(cfg: Config):
    """The step's autocast context (a no-op without --amp)."""
    if cfg.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(cfg.device.type, dtype=cfg.amp)


def build_floor(cfg: Config, images: torch.Tensor, mode: str, per_view: bool = False) -> Contender:
    """The bare backbone on both views' 2B images: forward+backward, a no-grad forward, Adam.

    With `per_view`, the same work as two batches of B (BatchNorm statistics per view, as the
    paper and ours forward them): a part of the split, not the floor.
    """
    net = make_net(cfg)
    views = BYOLAugment(cfg.image_size).normalize(torch.cat([images, images]))  # (2B, C, S, S): both "views", untimed
    if cfg.channels_last:
        views = views.contiguous(memory_format=torch.channels_last)
    batches = views.chunk(2) if per_view else (views,)  # 2 x (B, C, S, S) or 1 x (2B, C, S, S)
    run = torch.compile(net) if mode == "compile" else net
    opt = make_optimizer(net.parameters(), cfg)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(cfg):
            loss = sum(run(b).float().mean() for b in batches)
        loss.backward()
        with torch.no_grad(), autocast(cfg):
            for b in batches:
                run(b)
        opt.step()

    if per_view:
        return Contender("floor per view", step, kind="part", mode=mode)
    return Contender("floor", step, mode=mode, modules=[net], optimizer=opt, inputs=[views])


ONE_BATCH = "ours, views in one batch"


def build_ours(cfg: Config, images: torch.Tensor, mode: str, one_batch: bool = False) -> Contender:
    """byol_pytorch.BYOL with its defaults (or `views_in_one_batch=True`), on the uint8 batch."""
    learner = BYOL(make_net(cfg), cfg.image_size, views_in_one_batch=one_batch)
    with autocast(cfg):
        learner(images)  # creates the target network before any compilation
    run = torch.compile(learner) if mode == "compile" else learner
    opt = make_optimizer(learner.parameters(), cfg)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(cfg):
            loss = run(images)
        loss.backward()
        opt.step()
        learner.update_moving_average()

    return Contender(
        ONE_BATCH if one_batch else "ours", step, mode=mode, modules=[learner], optimizer=opt, inputs=[images]
    )


ENGINE = "ours, engine (the CLI's step)"


def build_ours_engine(cfg: Config, images: torch.Tensor, mode: str) -> Contender:
    """The step of ``byol-pytorch train``: the same learner driven by ``Engine`` + ``OptimizerStep``.

    One ``Engine.run`` per timed step over a one-batch stream, with the command's hooks
    (log, checkpoint) present but not due, so the step pays what the CLI's loop pays around
    the learner: the hook checks, the per-step loss read-back (CPU), the stop-signal handlers.
    """
    learner = BYOL(make_net(cfg), cfg.image_size)
    model = prepare_model(learner, DistContext(device=cfg.device), compile=mode == "compile")
    opt = make_optimizer(learner.parameters(), cfg)
    precision = "fp32" if cfg.amp is None else ("bf16" if cfg.amp == torch.bfloat16 else "fp16")
    engine = Engine(
        OptimizerStep(learner, model, opt, None, precision, cfg.device), DistContext(device=cfg.device), progress=False
    )
    state = TrainState(total=0)
    never = 10**9
    hooks = [Periodic(lambda s: s.take_interval(), every=never), Periodic(lambda s: None, every=never)]

    def step() -> None:
        state.total = state.step + 1
        engine.run(iter([StepBatch([images], 0, 0, state.step + 1, never)]), state, hooks)

    return Contender(ENGINE, step, mode=mode, modules=[learner], optimizer=opt, inputs=[images])


def build_peer(cfg: Config, images: torch.Tensor, mode: str, variant: str, peer) -> Contender:
    """lucidrains/byol-pytorch's BYOL (vanilla or its defaults) on the batch as float in [0, 1]."""
    learner = bench_peer.make_peer(peer, make_net(cfg), cfg.image_size, variant)
    run = torch.compile(learner) if mode == "compile" else learner
    opt = make_optimizer(learner.parameters(), cfg)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x = unit_float(images)  # the peer's augmentation wants float images in [0, 1]
        with autocast(cfg):
            loss = run(x)
        loss.backward()
        opt.step()
        learner.update_moving_average()

    return Contender(f"peer {variant}", step, mode=mode, modules=[learner], optimizer=opt, inputs=[images])


def build_parts(cfg: Config, images: torch.Tensor) -> list[Contender]:
    """Our overhead over the floor, each part alone: views, heads, EMA (eager)."""
    learner = BYOL(make_net(cfg), cfg.image_size)
    with autocast(cfg):
        learner(images)  # creates the target network
    dim = learner.representation_size
    # The "ema" part times update_moving_average() alone, again and again: its one warning about an EMA step
    # with no training forward since the last is what this part does on purpose.
    warnings.filterwarnings("ignore", message=r"update_moving_average\(\) was called again")

    @torch.no_grad()
    def views() -> None:
        with autocast(cfg):
            learner.augment1(images)
            learner.augment2(images)

    projector = copy.deepcopy(learner.online_encoder.projector)
    predictor = copy.deepcopy(learner.online_predictor)
    target_projector = copy.deepcopy(learner.target_encoder.projector)
    head_opt = make_optimizer(list(projector.parameters()) + list(predictor.parameters()), cfg)
    features = torch.randn(2, cfg.batch_size, dim, device=cfg.device)  # both views' pooled (B, D)

    def heads() -> None:
        head_opt.zero_grad(set_to_none=True)
        with autocast(cfg):
            prediction_one = predictor(projector(features[0]))
            prediction_two = predictor(projector(features[1]))
            with torch.no_grad():
                target_one, target_two = target_projector(features[0]), target_projector(features[1])
            loss = byol_loss(prediction_one, prediction_two, target_one, target_two)
        loss.backward()
        head_opt.step()

    return [
        build_floor(cfg, images, "eager", per_view=True),
        Contender("views", views, kind="part"),
        Contender("heads", heads, kind="part"),
        Contender("ema", learner.update_moving_average, kind="part"),
    ]


def _state_bytes(c: Contender) -> int:
    """Bytes of the distinct storages a contender keeps between steps (grads are None then)."""
    tensors = [t for m in c.modules for t in list(m.parameters()) + list(m.buffers())] + list(c.inputs)
    if c.optimizer is not None:
        tensors += [v for s in c.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_peak(c: Contender, device: torch.device) -> int:
    """Resident state + the step's peak of newly allocated bytes, in bytes."""
    if c.optimizer is not None:
        c.optimizer.zero_grad(set_to_none=True)
    state = _state_bytes(c)
    if device.type == "cuda":
        sync = device_sync(device)
        sync()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        c.step()
        sync()
        return state + torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        c.step()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    # The CPU allocator reports its running total of bytes allocated while profiling.
    totals = [
        (e["args"]["Total Allocated"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    if not totals:
        return state
    baseline = totals[0][0] - totals[0][1]
    return state + max(0, max(t for t, _ in totals) - baseline)


def run_rounds(contenders: list[Contender], cfg: Config) -> None:
    """Warm up each contender, then time steps round-robin: A B C ... A B C ..."""
    steps = [c.step for c in contenders]
    for c, timings in zip(contenders, time_alternating(steps, cfg.warmup, cfg.steps, device_sync(cfg.device))):
        c.timings = timings


def report(contenders: list[Contender], cfg: Config, peer_note: str) -> str:
    """The Markdown tables and where the goals stand."""
    wall = {(c.name, c.mode): c.timings.median("wall") for c in contenders}
    cpu = {(c.name, c.mode): c.timings.median("cpu") for c in contenders}
    med = cpu if cfg.clock == "cpu" else wall
    clock = "CPU-time" if cfg.clock == "cpu" else "wall-clock"
    steps = [c for c in contenders if c.kind == "step"]
    peer_key = ("peer vanilla", "eager") if ("peer vanilla", "eager") in med else None
    amp = "fp32" if cfg.amp is None else "bf16 autocast"
    fmt = "channels_last" if cfg.channels_last else "contiguous"
    threads = f", {torch.get_num_threads()} threads" if cfg.device.type == "cpu" else ""
    out = [
        f"### Training step: {cfg.arch}, {cfg.image_size} px, batch {cfg.batch_size}, {cfg.device.type}{threads}, "
        f"{amp}, {fmt}, Adam; median of {cfg.steps} alternated steps after {cfg.warmup} warm-up",
        "",
        f"images/s and the ratios use the {clock} medians; images/s counts source images (B per step).",
        "",
    ]
    rows = []
    for c in steps:
        key = (c.name, c.mode)
        floor = med.get(("floor", c.mode))
        rows.append(
            [
                c.name,
                c.mode,
                ms(wall[key]),
                ms(cpu[key]),
                f"{cfg.batch_size / med[key]:.1f}",
                "n/a" if c.peak_bytes is None else f"{c.peak_bytes / 2**20:.0f}",
                f"{med[key] / floor:.2f}x" if floor else "n/a",
                f"{med[peer_key] / med[key]:.2f}x" if peer_key else "n/a",
            ]
        )
    out.append(
        markdown_table(
            [
                "contender",
                "mode",
                "wall ms/step",
                "CPU ms/step",
                "images/s",
                "peak MiB",
                "time vs floor",
                "images/s vs peer vanilla eager",
            ],
            rows,
        )
    )
    if peer_note:
        out += ["", peer_note]
    parts = [c for c in contenders if c.kind == "part"]
    if parts and ("ours", "eager") in med and ("floor", "eager") in med:
        floor, ours = med[("floor", "eager")], med[("ours", "eager")]
        cost = {c.name: med[(c.name, c.mode)] for c in parts}
        if "floor per view" in cost:  # what forwarding each view alone adds to the floor
            cost["per-view forwards (floor per view - floor)"] = cost.pop("floor per view") - floor
        rows = [["floor (bare backbone)", ms(floor), "100%"]]
        rows += [[name, ms(t), f"{100 * t / floor:.1f}%"] for name, t in cost.items()]
        rest = ours - floor - sum(cost.values())
        rows.append(["rest (ours - floor - parts)", ms(rest), f"{100 * rest / floor:.1f}%"])
        rows.append(["ours", ms(ours), f"{100 * ours / floor:.1f}%"])
        out += [
            "",
            f"### Split of our overhead (eager, {clock} ms), each part timed alone in the same rounds",
            "",
            markdown_table(["part", "ms/step", "% of floor"], rows),
        ]
    out += ["", "### Goals", ""] + goals(med, cfg)
    return "\n".join(out)


def goals(med: dict[tuple, float], cfg: Config) -> list[str]:
    """Where the training-step goals of issue 6 stand, from the measured medians."""
    lines = []

    def best(name: str) -> tuple | None:
        found = [(med[(name, m)], m) for m in cfg.modes if (name, m) in med]
        return min(found) if found else None

    ours = best("ours")  # ours at its best mode, against the floor in that mode
    peer = med.get(("peer vanilla", "eager"))
    where = "GPU at 224 px" if cfg.device.type == "cuda" else "CPU"
    limit = GPU_FLOOR_GOAL if cfg.device.type == "cuda" else CPU_FLOOR_GOAL
    if ours and ("floor", ours[1]) in med:
        ratio = ours[0] / med[("floor", ours[1])]
        lines.append(
            f"- Our step within {limit}x of the floor on the {where}: {verdict(ratio <= limit)} "
            f"({ratio:.2f}x, ours {ours[1]} {ms(ours[0])} ms vs floor {ms(med[('floor', ours[1])])} ms)."
        )
    if ours and peer:
        speed = peer / ours[0]
        if cfg.device.type == "cuda":
            lines.append(
                f"- At least {GPU_PEER_GOAL}x the peer's images/s on the GPU: "
                f"{verdict(speed >= GPU_PEER_GOAL)} ({speed:.2f}x vs peer vanilla eager)."
            )
        else:
            tie = " (a tie: inside the run-to-run noise of a few %)" if 0.98 <= speed < 1.0 else ""
            lines.append(
                f"- Not slower than the peer on the CPU: {verdict(speed >= 1.0)}{tie} "
                f"({speed:.3f}x the images/s of peer vanilla)."
            )
    together = best(ONE_BATCH)  # the opt-in, reported against the same goals but not judged
    if together and peer:
        lines.append(
            f"- The opt-in `views_in_one_batch=True` (not the default), {together[1]}: "
            f"{peer / together[0]:.3f}x the images/s of peer vanilla eager, "
            f"{together[0] / med[('floor', together[1])]:.2f}x the floor."
        )
    if cfg.device.type != "cuda":
        lines.append(
            f"- GPU goals (within {GPU_FLOOR_GOAL}x of the floor at 224 px, {GPU_PEER_GOAL}x the peer): "
            "**not measurable here (no GPU in this run)**; run `python -m benchmarks.train_step "
            "--device cuda` on one."
        )
    return lines


def main(args: argparse.Namespace) -> str:
    cfg = resolve_config(args)
    threads = 1 if args.smoke and args.threads is None else args.threads
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    images = random_images(cfg.batch_size, cfg.image_size, device=cfg.device)
    peer, peer_note = None, ""
    if not args.no_peer:
        peer, peer_note = bench_peer.load_peer_or_skip()
    contenders: list[Contender] = []
    for mode in cfg.modes:
        contenders += [build_floor(cfg, images, mode), build_ours(cfg, images, mode)]
        if not args.no_one_batch:
            contenders.append(build_ours(cfg, images, mode, one_batch=True))
        if not args.no_engine:
            contenders.append(build_ours_engine(cfg, images, mode))
        if peer is not None:
            for variant in bench_peer.VARIANTS:
                try:
                    c = build_peer(cfg, images, mode, variant, peer)
                    if mode == "compile":
                        c.step()  # does it compile at all?
                    contenders.append(c)
                except Exception as error:  # the peer may not compile; say so instead of failing
                    peer_note += f" peer {variant} {mode}: failed ({type(error).__name__}: {error})."
    if not args.no_parts and "eager" in cfg.modes:
        contenders += build_parts(cfg, images)
    run_rounds(contenders, cfg)
    for c in contenders:
        if c.kind == "step":
            c.peak_bytes = measure_peak(c, cfg.device)
    table = report(contenders, cfg, peer_note)
    print(table)
    if args.out is not None:
        write_results(args.out, "Training step benchmark", machine(torchvision), table, append=args.append)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
