"""EMA update of a resnet50's parameters: ours vs the peer's loop vs an in-place loop.

``target <- tau * target + (1 - tau) * online`` over the 161 parameter tensors (25.6 M
values) of two torchvision resnet50 copies:

* ``ours``: ``byol_pytorch.ema.ema_update_``, one fused ``torch._foreach_lerp_`` call;
* ``peer loop``: lucidrains/byol-pytorch 0.9.1's own ``update_moving_average(EMA(tau), ...)``,
  which assigns ``param.data = old * beta + (1 - beta) * new`` tensor by tensor;
* ``in-place loop``: ``t.mul_(tau).add_(o, alpha=1 - tau)`` for each tensor.

Calls alternate between the contenders (A B C A B C ...) after warm-up calls; the table
gives the median per call (with a device synchronisation around each on a GPU).

    python -m benchmarks.ema                  # CPU, and the GPU too when there is one
    python -m benchmarks.ema --smoke          # resnet18, a few calls: seconds
    python -m benchmarks.ema --out benchmarks/results/ema.md
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision

from benchmarks.common.machine import machine
from benchmarks.common.peer import load_peer_or_skip
from benchmarks.common.report import markdown_table, verdict, write_results
from benchmarks.common.runner import device_sync, time_alternating
from byol_pytorch.ema import ema_update_

GPU_GOAL = 5.0  # issue 6: at least 5x faster than the peer's loop on a GPU
TAU = 0.99


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--devices", default=None, help="comma list of cpu,cuda (default: cpu, plus cuda when available)"
    )
    parser.add_argument("--arch", default="resnet50", help="torchvision model whose parameters are averaged")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per contender (default 30 CPU, 200 GPU)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per contender first")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own); 1 is steadier on a shared machine",
    )
    parser.add_argument("--no-peer", action="store_true", help="leave the peer out")
    parser.add_argument("--smoke", action="store_true", help="resnet18, 3 calls: runs in seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the table, machine and command here")
    return parser


def inplace_loop(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
    """The usual hand-written EMA: two in-place kernels per tensor, one tensor at a time."""
    with torch.no_grad():
        for t, o in zip(target, online):
            t.mul_(tau).add_(o, alpha=1 - tau)


def contenders_for(device: torch.device, arch: str, peer) -> tuple[dict[str, Callable[[], None]], int]:
    """The EMA calls to time on `device`, each on its own pair of networks, and the values averaged per call."""
    calls: dict[str, Callable[[], None]] = {}

    def pair():
        online = getattr(torchvision.models, arch)().to(device)
        target = getattr(torchvision.models, arch)().to(device)
        for p in target.parameters():
            p.requires_grad_(False)
        return target, online

    target, online = pair()
    t_params, o_params = list(target.parameters()), list(online.parameters())
    calls["ours (foreach lerp)"] = lambda: ema_update_(t_params, o_params, TAU)
    if peer is not None:
        p_target, p_online = pair()
        updater = peer.EMA(TAU)
        calls["peer loop"] = lambda: peer.update_moving_average(updater, p_target, p_online)
    l_target, l_online = pair()
    l_t, l_o = list(l_target.parameters()), list(l_online.parameters())
    calls["in-place loop"] = lambda: inplace_loop(l_t, l_o, TAU)
    return calls, sum(p.numel() for p in t_params)


def medians(
    calls: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall-clock, process CPU) seconds per call, calls alternated A B C A B C ..."""
    timings = time_alternating(list(calls.values()), warmup, repeats, device_sync(device))
    return {name: (t.median("wall"), t.median("cpu")) for name, t in zip(calls, timings)}


def main(args: argparse.Namespace) -> str:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.devices or ("cpu,cuda" if torch.cuda.is_available() else "cpu")
    arch = "resnet18" if args.smoke else args.arch
    peer, note = None, ""
    if not args.no_peer:
        peer, note = load_peer_or_skip()
    rows, verdicts = [], []
    for name in devices.split(","):
        device = torch.device(name.strip())
        repeats = args.repeats or (3 if args.smoke else 200 if device.type == "cuda" else 30)
        warmup = 1 if args.smoke else args.warmup
        calls, numel = contenders_for(device, arch, peer)
        both = medians(calls, device, warmup, repeats)
        # On the CPU the process's CPU time is what the ratios use: other jobs on a shared
        # machine stretch the wall clock but barely the CPU time. On a GPU: the wall clock.
        med = {k: (w if device.type == "cuda" else c) for k, (w, c) in both.items()}
        ours = med["ours (foreach lerp)"]
        for contender, (w, c) in both.items():
            seconds = med[contender]
            rows.append(
                [
                    device.type,
                    contender,
                    f"{w * 1e3:.2f}",
                    f"{c * 1e3:.2f}",
                    f"{numel * 4 * 3 / seconds / 1e9:.1f}",
                    f"{seconds / ours:.2f}x",
                ]
            )
        if "peer loop" in med:
            speedup = med["peer loop"] / ours
            if device.type == "cuda":
                verdicts.append(
                    f"- At least {GPU_GOAL}x faster than the peer's loop on the GPU: "
                    f"{verdict(speedup >= GPU_GOAL)} ({speedup:.2f}x)."
                )
            else:
                verdicts.append(
                    f"- CPU figure (reported, no goal): ours is {speedup:.2f}x faster than the peer's loop "
                    f"and {med['in-place loop'] / ours:.2f}x faster than the in-place loop."
                )
    if "cuda" not in devices:
        verdicts.append(
            f"- GPU goal (at least {GPU_GOAL}x the peer's loop): **not measurable here (no GPU in this "
            "run)**; run `python -m benchmarks.ema` on a machine with CUDA."
        )
    table = "\n".join(
        [
            f"### EMA update of {arch} parameters ({numel / 1e6:.1f} M values, tau {TAU}), median per call",
            "",
            f"GB/s and ratios use the CPU time on the CPU ({torch.get_num_threads()} threads) "
            "and the wall clock on a GPU.",
            "",
            markdown_table(
                ["device", "contender", "wall ms", "CPU ms", "GB/s (3 x 4 B per value)", "time vs ours"], rows
            ),
            *([""] + [note] if note else []),
            "",
            "### Goals",
            "",
            *verdicts,
        ]
    )
    print(table)
    if args.out is not None:
        write_results(args.out, "EMA update benchmark", machine(), table)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
