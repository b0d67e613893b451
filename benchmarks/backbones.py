"""Default construction, one step, EMA and the embedding over every timm and torchvision classifier.

For each architecture under 100 M parameters (counted on the meta device, nothing
built for real above it) in ``timm.list_models()`` and every torchvision
classification builder, with random weights: ``BYOL(net, image_size)`` with the
default ``hidden_layer="auto"``, one Adam step, ``update_moving_average()`` and
``learner(x, return_embedding=True)``. A model passes when construction leaves its
state_dict bit-identical, the loss is finite, the stem gets a non-zero gradient, the
target moves towards the online net, and the embedding is (B, D) with D the model's
own pooled width (timm: ``head_hidden_size`` or ``num_features``; torchvision: the
``in_features`` of the last Linear it registers).

Each model runs in a worker process with a time cap; results go to a JSON file after
every model, so an interrupted run resumes where it stopped:

    OMP_NUM_THREADS=1 python -m benchmarks.backbones --out benchmarks/results/backbones.md
    python -m benchmarks.backbones --filter 'resnet*' --limit 5
    python -m benchmarks.backbones --report-only --out benchmarks/results/backbones.md
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from benchmarks.common import REPO
from benchmarks.common.runner import spawn_module

MODULE = "benchmarks.backbones"
MAX_PARAMS = 100_000_000
SMALL_SIDE = 64  # image size for models whose constructor takes img_size
TV = "torchvision:"


# ----------------------------------------------------------------------------- one model (worker side)
def _count_params(name: str) -> int:
    """Parameter count from a build on the meta device (no memory, no init)."""
    import torch

    try:
        with torch.device("meta"):
            net = _create(name, None)
    except Exception:  # an initialiser that reads values: count on a real build
        net = _create(name, None)
    return sum(p.numel() for p in net.parameters())


def _default_size(name: str) -> int:
    if name.startswith(TV):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name[len(TV) :])
            return int(weights.DEFAULT.transforms().crop_size[0])
        except Exception:
            return 224
    import timm

    cfg = timm.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def _create(name: str, img_size: int | None):
    if name.startswith(TV):
        import torchvision

        kwargs = {"image_size": img_size} if img_size is not None else {}
        return torchvision.models.get_model(name[len(TV) :], weights=None, **kwargs)
    import timm

    kwargs = {"img_size": img_size} if img_size is not None else {}
    return timm.create_model(name, pretrained=False, **kwargs)


def _build(name: str):
    """(net, image size): at a small size where the constructor takes one and the net runs there."""
    import torch

    default = _default_size(name)
    if default > SMALL_SIDE:
        try:
            net = _create(name, SMALL_SIDE)
            with torch.no_grad():
                net.eval()(torch.zeros(1, 3, SMALL_SIDE, SMALL_SIDE))
            return net.train(), SMALL_SIDE
        except Exception:
            pass  # no img_size argument, or the architecture wants its own size
    return _create(name, None), default


def _expected_width(name: str, net) -> int:
    import torch.nn as nn

    if name.startswith(TV):
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise AssertionError("[embed] no Linear classifier (a convolution makes the logits): no known width")
        return int(linears[-1].in_features)
    return int(getattr(net, "head_hidden_size", None) or net.num_features)


def _stem(net):
    import torch.nn as nn

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad:
            return m.weight
    return next(p for p in net.parameters() if p.requires_grad)


def _check(ok: bool, stage: str, message: str) -> None:
    if not ok:
        raise AssertionError(f"[{stage}] {message}")


def run_one(name: str) -> dict:
    """Everything the module docstring lists, for one model; a dict with status and reason."""
    import torch

    from byol_pytorch import BYOL

    started, stage, record = time.perf_counter(), "count", {"name": name}
    try:
        record["params_m"] = round(_count_params(name) / 1e6, 2)
        if record["params_m"] * 1e6 >= MAX_PARAMS:
            return {**record, "status": "skipped", "reason": f"{record['params_m']} M parameters"}
        stage = "build"
        torch.manual_seed(0)
        net, size = _build(name)
        record["size"] = size
        state = {k: v.clone() for k, v in net.state_dict().items()}
        stage = "construct"
        learner = BYOL(net, image_size=size, projection_size=32, projection_hidden_size=64)
        record["hidden_layer"], record["dim"] = learner.hidden_layer, learner.representation_size
        _check(all(torch.equal(state[k], v) for k, v in net.state_dict().items()), stage, "construction changed it")
        stage = "step"
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-4)
        x = torch.rand(2, 3, size, size)
        loss = learner(x)
        _check(bool(torch.isfinite(loss)), stage, f"loss {loss.item()}")
        loss.backward()
        stem = _stem(net)
        _check(stem.grad is not None and bool(stem.grad.abs().sum() > 0), stage, "no gradient at the stem")
        optimizer.step()
        stage = "ema"
        online = stem.detach().clone()
        target = dict(learner.target_encoder.net.named_parameters())
        key = next(k for k, p in net.named_parameters() if p is stem)
        before = target[key].detach().clone()
        learner.update_moving_average()
        expected = before.lerp(online, 1 - 0.99)
        _check(torch.allclose(target[key], expected, atol=1e-6), stage, "target did not move by tau")
        stage = "embed"
        learner.eval()
        with torch.no_grad():
            _, embedding = learner(x, return_embedding=True)
        width = _expected_width(name, net)
        shape = tuple(embedding.shape)
        _check(shape == (2, width), stage, f"embedding {shape}, expected (2, {width})")
        _check(bool(torch.isfinite(embedding).all()), stage, "non-finite embedding")
        record.update(status="pass", reason="")
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        where = "" if text.startswith("[") else f"[{stage}] "
        record.update(status="fail", reason=f"{where}{type(err).__name__}: {text}"[:300])
        if os.environ.get("BACKBONES_TRACE"):
            traceback.print_exc(file=sys.stderr)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def worker() -> None:
    """Read model names from stdin, one a line; answer each with a JSON line on stdout."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for line in sys.stdin:
        name = line.strip()
        if name:
            print(json.dumps(run_one(name)), flush=True)


# ----------------------------------------------------------------------------- the run (parent side)
def all_names() -> list[str]:
    """Every timm architecture and torchvision classification builder."""
    import timm
    import torchvision

    return list(timm.list_models()) + [TV + n for n in torchvision.models.list_models(module=torchvision.models)]


class Worker:
    """A worker process fed one name at a time; killed and replaced when a model runs too long."""

    def __init__(self) -> None:
        self.proc = spawn_module(  # OpenMP threads: OMP_NUM_THREADS where set, else 1
            MODULE,
            "--worker",
            threads=os.environ.get("OMP_NUM_THREADS", "1"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.done = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of stream: the worker died

    def ask(self, name: str, timeout: float) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                return {"name": name, "status": "fail", "reason": f"[timeout] over {timeout:.0f} s"}
            if not line:
                return {"name": name, "status": "fail", "reason": "[crash] the worker process died"}
            if line.startswith("{"):
                self.done += 1
                return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run(
    names: list[str], results_path: Path, timeout: float, rerun_failures: bool = False, recycle: int = 25
) -> dict[str, dict]:
    """Run the names not yet in the JSON file (or failed there, with ``rerun_failures``), saving after each."""
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if rerun_failures:
        results = {n: r for n, r in results.items() if r["status"] != "fail" or n not in names}
    todo = [n for n in names if n not in results]
    print(f"{len(names) - len(todo)} of {len(names)} already done; running {len(todo)}", flush=True)
    current: Worker | None = None
    try:
        for i, name in enumerate(todo, 1):
            if current is None or current.done >= recycle:
                if current is not None:
                    current.close()
                current = Worker()
            record = current.ask(name, timeout)
            if record.get("reason", "").startswith(("[timeout]", "[crash]")):
                current.close()
                current = None
            results[name] = record
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1, sort_keys=True))
            print(f"[{i}/{len(todo)}] {name}: {record['status']} {record.get('reason', '')}", flush=True)
    finally:
        if current is not None:
            current.close()
    return results


# Why the failures left fail (fnmatch pattern -> the cause, found by reading the model).
NOTES = {
    "tresnet*": "the first convolution reads a space-to-depth input (48 = 3 x 4 x 4 channels), so the default "
    "channel count (that convolution's in_channels) is wrong; `channels=3` works",
    "efficientnet_b3_pruned": "with its random init the features are constant (std ~1e-13): the gradient vanishes "
    "before the stem; nothing BYOL can change",
    "resnet*_clip*": "the net's output is its attention pool's projection of the class token (the 512-wide CLIP "
    "embedding, `num_classes=512`), no classifier Linear follows: auto takes it, timm's pre-logits is the 2048 "
    "tokens before the projection",
    "efficientvim*": "four heads (and, distilled, four distillation heads) each read another stage's pooled features; "
    "timm's pre-logits is their concatenation, which no single layer holds: pass a hidden_layer",
    "crossvit*": "two branches of different widths, each with its own head on its own class token; timm's "
    "pre-logits is their concatenation, which no single layer holds: pass a hidden_layer",
    "convformer*": "the classifier is an MLP head (Linear 768 -> 3072 -> classes): auto takes the input of its final "
    "Linear (3072) as for torchvision's VGG, timm's pre-logits is the head's input (768); "
    "`hidden_layer='head.norm'` gives that",
    "caformer*": "as convformer: an MLP classifier head, auto takes the input of its final Linear",
    "davit_base_fl": "not a failure of BYOL: over the time cap on this shared, loaded 2-core machine",
    "torchvision:squeezenet*": "the classifier is a 1x1 convolution over 13x13 maps followed by ReLU and average "
    "pooling: auto takes the 1000 logits; pass `hidden_layer='features'`",
}


def report(results: dict[str, dict], total: int, command: str) -> str:
    """The Markdown section: N of M pass, each failure with its reason, what was not run."""
    import timm
    import torchvision

    from benchmarks.common.machine import machine
    from benchmarks.common.report import markdown_table

    ran = [r for r in results.values() if r["status"] != "skipped"]
    passed = [r for r in ran if r["status"] == "pass"]
    failed = sorted((r for r in ran if r["status"] == "fail"), key=lambda r: r["name"])
    skipped = [r for r in results.values() if r["status"] == "skipped"]
    not_run = total - len(results)
    lines = [
        "# Backbones: default BYOL construction, one step, EMA and embedding",
        "",
        f"Machine: {machine(timm, torchvision)}",
        "",
        f"Command: `{command}`",
        "",
        f"**{len(passed)} of {len(ran)} pass** (architectures under 100 M parameters that were run). "
        f"Of {total} names (`timm.list_models()` and torchvision classification builders), "
        f"{len(results)} were examined: {len(skipped)} have 100 M parameters or more and are out of scope; "
        + (
            f"**{not_run} were not run yet** (the run is resumable; models run in a seeded shuffled order, so "
            "those run are a sample across families)."
            if not_run
            else "all were run."
        ),
        "",
        'Per model: `BYOL(net, image_size)` with `hidden_layer="auto"` (state_dict bit-identical after it), '
        "one Adam step on a batch of 2 (finite loss, non-zero stem gradient), `update_moving_average()` "
        "(target = tau * target + (1 - tau) * online), and `learner(x, return_embedding=True)` of shape "
        "(2, D) with D the model's pooled width (timm: `head_hidden_size` or `num_features`; torchvision: "
        f"the last Linear's `in_features`). Input: {SMALL_SIDE} px where the constructor takes `img_size` "
        "and the net runs there, else the model's default input size.",
        "",
        "## Failures",
        "",
    ]
    if failed:
        lines.append(markdown_table(["model", "reason"], [[r["name"], r["reason"].replace("|", "/")] for r in failed]))
        notes = [(p, why) for p, why in NOTES.items() if any(fnmatch.fnmatch(r["name"], p) for r in failed)]
        if notes:
            lines += ["", "Why:", ""] + [f"- `{pattern}`: {why}." for pattern, why in notes]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="*", help="fnmatch pattern(s), comma-separated, on the names")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many (after --filter)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per model")
    parser.add_argument("--seed", type=int, default=0, help="order of the run: a shuffle, so a partial run samples all")
    parser.add_argument(
        "--results", type=Path, default=REPO / ".bench" / "backbones.json", help="the resumable JSON results"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--report-only", action="store_true", help="write the table from the JSON, run nothing")
    parser.add_argument("--rerun-failures", action="store_true", help="run the models that failed before again")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    names = all_names()
    total = len(names)
    patterns = args.filter.split(",")
    names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    random.Random(args.seed).shuffle(names)
    if args.limit is not None:
        names = names[: args.limit]
    if args.report_only:
        results = json.loads(args.results.read_text()) if args.results.exists() else {}
    else:
        results = run(names, args.results, args.timeout, args.rerun_failures)
    command = f"OMP_NUM_THREADS=1 python -m benchmarks.backbones --out {args.out or '...'}"
    text = report(results, total, command)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
