"""BYOL pretraining with Hugging Face accelerate, on a folder of images.

What it shows:

* ``accelerator.prepare(learner, optimizer, loader)``: the same script runs on a CPU,
  one GPU, or many through ``accelerate launch`` (DDP). Batches arrive on the device as
  ``uint8``; ``BYOL`` makes the two augmented views there.
* ``accelerator.backward(loss)`` and ``accelerator.accumulate(learner)`` for gradient
  accumulation; the target network moves one EMA step per real optimizer step
  (``accelerator.sync_gradients``), and not after a step that fp16's GradScaler skipped
  (``accelerator.optimizer_step_was_skipped``).
* The EMA runs on the unwrapped learner: under DDP ``learner`` is the wrapper, and
  ``accelerator.unwrap_model(learner)`` is the ``BYOL`` inside. DDP wraps the learner
  itself, so it reads ``BYOL._ddp_params_and_buffers_to_ignore`` (the classifier after
  the hidden layer and the target network) with no extra set-up. On GPUs the heads are
  converted to SyncBatchNorm at the first step, since accelerate created the process
  group (``BYOL(sync_batchnorm=None)``).
* The trained backbone is saved by the main process only.

Usage (a check on a laptop CPU, in seconds; no ``accelerate launch`` needed)::

    python examples/accelerate_train.py --data DIR --model resnet10t --image-size 32 \\
        --batch-size 4 --steps 2 --workers 0 --projection-hidden-size 256

On all the GPUs of a machine::

    accelerate launch --multi_gpu examples/accelerate_train.py --data DIR --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from byol_pytorch import BYOL
from byol_pytorch.data import ImageFolder, load_size_for, make_loader
from byol_pytorch.training.optim import add_optimizer_flags, build_optimizer, optimizer_settings


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of this example."""
    parser = argparse.ArgumentParser(
        description="BYOL pretraining with Hugging Face accelerate on a folder of images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="folder of images, searched recursively; no labels needed")
    parser.add_argument("--model", default="resnet18", help="any timm model name, built with pretrained=False")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (the loader cycles over epochs)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch and process; at least 2")
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="batches whose gradients are summed per optimizer step",
    )
    parser.add_argument(
        "--mixed-precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="autocast precision; default: accelerate's config or environment",
    )
    parser.add_argument("--image-size", type=int, default=96, help="side of the augmented views fed to the net")
    add_optimizer_flags(parser, per="the images per optimizer step (all processes)")
    parser.add_argument(
        "--tau",
        type=float,
        default=0.99,
        help="initial EMA decay of the target, raised to 1 by a cosine (paper Sec. 3.2); the README advises "
        "0.99 with SGD, and 0.996 with AdamW except on a ResNet",
    )
    parser.add_argument(
        "--projection-hidden-size",
        type=int,
        default=4096,
        help="hidden width of projector and predictor (paper: 4096); smaller for quick tests",
    )
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per process")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the shuffle and the augmentations")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every N optimizer steps")
    parser.add_argument("--out", default="byol_net.pt", help="where the trained backbone's state_dict is saved")
    return parser


def forever(loader: Iterable) -> Iterator:
    """Yield batches from ``loader`` epoch after epoch, without end."""
    while True:
        yield from loader


def main(args: argparse.Namespace) -> BYOL:
    """Train, save ``net.state_dict()`` to ``args.out`` (main process), return the unwrapped learner.

    Raises:
        ValueError: bad sizes, or a ``--data`` folder without images.
        FloatingPointError: the loss turned NaN or Inf.
    """
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2 for BYOL's BatchNorm heads, got {args.batch_size}")
    for flag, value in (
        ("--log-every", args.log_every),
        ("--gradient-accumulation-steps", args.gradient_accumulation_steps),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    out = Path(args.out)  # checked before training, not after it: a bad --out would throw the run away
    if out.is_dir() or any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise ValueError(f"--out {out} is a folder or lies under a file; name a file to write, e.g. a folder/net.pt")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision
    )
    set_seed(args.seed)  # the same net on every process: DDP broadcasts the trained part, not the ignored classifier
    net = timm.create_model(args.model, pretrained=False)
    set_seed(args.seed, device_specific=True)  # distinct augmentations on every process
    learner = BYOL(
        net,
        image_size=args.image_size,
        projection_hidden_size=args.projection_hidden_size,
        moving_average_decay=args.tau,
        moving_average_total_steps=args.steps,  # counts update_moving_average() calls
    )
    dataset = ImageFolder(args.data, load_size=load_size_for(args.image_size), channels=learner.channels)
    loader = make_loader(dataset, batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    # The online network only (the target is made at the first forward, without gradients);
    # biases and norms get no weight decay. The default lr follows the images per step.
    per_step = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    lr, decay = optimizer_settings(args, images_per_step=per_step)
    optimizer = build_optimizer(args.optimizer, learner, lr=lr, weight_decay=decay)

    # Moves everything to accelerator.device, wraps the learner in DDP when launched on
    # several processes, and shards the loader (each process its own batches).
    learner, optimizer, loader = accelerator.prepare(learner, optimizer, loader)
    byol = accelerator.unwrap_model(learner)  # the BYOL module itself, for the EMA

    learner.train()
    step = 0
    skipped_files = 0
    for images, skipped in forever(loader):
        skipped_files += skipped
        with accelerator.accumulate(learner):  # no DDP gradient sync until the last micro-batch
            loss = learner(images)  # images: (B, C, S, S) uint8 on the device
            accelerator.backward(loss)
            optimizer.step()  # a no-op while accumulating
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue  # still accumulating: no optimizer step happened, so no EMA step
        if not accelerator.optimizer_step_was_skipped:
            byol.update_moving_average()
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at step {step}; lower --lr, or check the images")
            accelerator.print(f"step {step}/{args.steps}  loss {value:.4f}  tau {byol.current_decay:.5f}")
        if step == args.steps:
            break

    if skipped_files:
        print(f"warning: {skipped_files} unreadable image files were skipped on process {accelerator.process_index}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            torch.save({k: v.cpu() for k, v in byol.net.state_dict().items()}, tmp)  # CPU tensors: loads anywhere
            os.replace(tmp, out)  # atomic: never a half-written file under the final name
        finally:
            tmp.unlink(missing_ok=True)  # a failed save leaves no temporary file
        accelerator.print(f"saved the trained {args.model} to {out}")
    return byol


if __name__ == "__main__":
    main(get_args_parser().parse_args())
