"""BYOL pretraining of any timm backbone on a folder of images, in a plain PyTorch loop.

The whole recipe in one file, top to bottom: build the net, wrap it in ``BYOL``, feed it
``uint8`` batches (the two augmented views are made on the training device, inside
``BYOL``), step momentum SGD (the README's advice for ResNets, ConvNeXt and the BatchNorm
mobile nets; ``--optimizer`` offers LARS and AdamW), then move the target network one EMA
step. Tau starts at 0.99 and follows the paper's cosine schedule over the run
(``moving_average_total_steps``). At the end the backbone's own ``state_dict`` is saved,
ready for ``timm.create_model(NAME)``.

Usage::

    python examples/own_training_loop.py --data DIR --model resnet18 --steps 1000 \\
        --batch-size 64 --image-size 96 --out resnet18_byol.pt

A check on a laptop CPU, in seconds::

    python examples/own_training_loop.py --data DIR --model resnet10t --image-size 32 \\
        --batch-size 4 --steps 2 --workers 0 --projection-hidden-size 256 --out /tmp/net.pt

Loading the result::

    net = timm.create_model("resnet18", pretrained=False)
    net.load_state_dict(torch.load("resnet18_byol.pt", weights_only=True))

For resume, checkpoints, metrics and many GPUs use ``byol-pytorch train`` instead.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import timm
import torch

from byol_pytorch import BYOL
from byol_pytorch.data import ImageFolder, load_size_for, make_loader
from byol_pytorch.training.optim import add_optimizer_flags, build_optimizer, optimizer_settings


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of this example."""
    parser = argparse.ArgumentParser(
        description="BYOL pretraining on a folder of images, plain PyTorch loop",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="folder of images, searched recursively; no labels needed")
    parser.add_argument("--model", default="resnet18", help="any timm model name, built with pretrained=False")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (the loader cycles over epochs)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per step; BYOL needs at least 2 (BatchNorm statistics in the heads)",
    )
    parser.add_argument("--image-size", type=int, default=96, help="side of the augmented views fed to the net")
    parser.add_argument(
        "--load-size",
        type=int,
        default=None,
        help="side the images are resized to when loaded; default image-size * 256/224 (rounded), "
        "the usual margin above the crop size",
    )
    add_optimizer_flags(parser, per="the batch size")
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
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (0: load in this process)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="training device")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the shuffle and the augmentations")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    parser.add_argument("--out", default="byol_net.pt", help="where the trained backbone's state_dict is saved")
    return parser


def forever(loader: Iterable) -> Iterator:
    """Yield batches from ``loader`` epoch after epoch, without end."""
    while True:
        yield from loader


def save_atomically(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``.

    An interrupted save never leaves a half-written file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(args: argparse.Namespace) -> BYOL:
    """Train, save ``net.state_dict()`` to ``args.out``, and return the learner.

    Raises:
        ValueError: bad sizes, or a ``--data`` folder without images.
        FloatingPointError: the loss turned NaN or Inf.
    """
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2 for BYOL's BatchNorm heads, got {args.batch_size}")
    if args.log_every < 1:
        raise ValueError(f"--log-every must be at least 1, got {args.log_every}")
    out = Path(args.out)  # checked before training, not after it: a bad --out would throw the run away
    if out.is_dir() or any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise ValueError(f"--out {out} is a folder or lies under a file; name a file to write, e.g. a folder/net.pt")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # pinned batches and CUDA events go to this GPU, not GPU 0

    # 1. The backbone and its learner. BYOL finds the representation (the input of the
    #    classifier), adds projector and predictor, and trains `net` in place.
    net = timm.create_model(args.model, pretrained=False).to(device)
    learner = BYOL(
        net,
        image_size=args.image_size,
        projection_hidden_size=args.projection_hidden_size,
        moving_average_decay=args.tau,
        moving_average_total_steps=args.steps,  # cosine tau: args.tau -> 1 over the run
    )

    # 2. Data: uint8 (B, C, S, S) batches, resized once; broken files are skipped and counted.
    load_size = args.load_size or load_size_for(args.image_size)
    dataset = ImageFolder(args.data, load_size=load_size, channels=learner.channels)
    loader = make_loader(dataset, batch_size=args.batch_size, workers=args.workers, seed=args.seed)

    # 3. The optimizer sees the online network only: the target is made later (first
    #    forward), without gradients, and the classifier after the hidden layer gets no
    #    gradient, so it is left out (weight decay included). Biases and norms get no decay.
    lr, decay = optimizer_settings(args, images_per_step=args.batch_size)
    optimizer = build_optimizer(args.optimizer, learner, lr=lr, weight_decay=decay)

    # 4. The loop.
    learner.train()
    batches = forever(loader)
    skipped_files = 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, skipped = next(batches)
        skipped_files += skipped
        images = images.to(device, non_blocking=True)  # (B, C, S, S) uint8: 4x fewer bytes than float

        loss = learner(images)  # both views are augmented here, on `device`
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_moving_average()  # once per optimizer step, after it

        if step % args.log_every == 0 or step == args.steps:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at step {step}; lower --lr, or check the images")
            rate = step * args.batch_size / (time.perf_counter() - start)
            print(f"step {step}/{args.steps}  loss {value:.4f}  tau {learner.current_decay:.5f}  {rate:.1f} img/s")

    if skipped_files:
        print(f"warning: {skipped_files} unreadable image files were skipped (and replaced by readable ones)")

    # 5. The backbone alone, classifier included, loadable into timm.create_model(args.model).
    save_atomically({k: v.cpu() for k, v in net.state_dict().items()}, out)  # CPU tensors: loads anywhere
    print(f"saved the trained {args.model} to {out}")
    return learner


if __name__ == "__main__":
    main(get_args_parser().parse_args())
