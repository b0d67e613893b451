"""BYOL as a Lightning ``LightningModule``, trained on a folder of images.

What it shows:

* ``BYOLModule`` wraps ``BYOL`` around any backbone; ``training_step`` returns its loss.
* The target network moves one EMA step per real optimizer step. ``optimizer_step`` is
  the hook for it: Lightning calls it once per step, not during the accumulation phase
  of ``accumulate_grad_batches`` (``on_train_batch_end`` runs for every batch, and would
  average too often). A step that fp16's GradScaler skipped (Inf/NaN gradients) does not
  move the target either.
* Tau follows the cosine schedule over ``trainer.estimated_stepping_batches``, the
  number of optimizer steps of the fit, accumulation included (constant when Lightning
  cannot tell: an iterable loader with ``max_epochs``). A second ``fit`` of the same
  module (training on in a notebook) extends the schedule by its own steps: kept, tau
  would reach 1 and the target stop moving.
* Several devices (DDP): Lightning wraps this module, not the learner, in
  ``DistributedDataParallel``, so the learner's own ``_ddp_params_and_buffers_to_ignore``
  would go unread. The module forwards it, prefixed with ``learner.``: the classifier
  after the hidden layer (no gradient) and the target network (averaged identically on
  every rank; its BatchNorm statistics stay per rank) are left out of DDP. That keeps
  DDP's default ``find_unused_parameters=False``; ``DDPStrategy(find_unused_parameters
  =True)`` would also run, but searches the autograd graph for unused parameters every
  step, and DDP would broadcast the target's buffers from rank 0 after a resume.
* SyncBatchNorm: on GPUs, ``BYOL(sync_batchnorm=None)`` converts the projector and
  predictor to SyncBatchNorm at the first training step when a process group of more
  than one process exists, so also the one Lightning creates after the learner was
  built. ``Trainer(sync_batchnorm=True)`` converts the backbone's BatchNorm as well.
* A non-finite loss raises ``FloatingPointError`` at ``update_moving_average()``, read from
  each process's own flags without a host sync: under DDP the rank that saw a bad batch
  raises a step or so before the others learn of it through the reduced gradients. To stop
  every rank together, set ``learner.finite_check = False`` and all-reduce (MIN)
  ``learner.take_finite_flags()`` every few steps, as ``byol-pytorch train``'s engine does.

Usage (a check on a laptop CPU, in seconds)::

    python examples/lightning_module.py --data DIR --model resnet10t --image-size 32 \\
        --batch-size 4 --steps 2 --workers 0 --projection-hidden-size 256 --accelerator cpu

On all the GPUs of a machine, with DDP: ``--accelerator gpu --devices -1``.
The trained backbone's ``state_dict`` is saved to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn as nn

from byol_pytorch import BYOL
from byol_pytorch.data import ImageFolder, load_size_for, make_loader
from byol_pytorch.training.optim import add_optimizer_flags, build_optimizer, optimizer_settings


class BYOLModule(L.LightningModule):
    """A LightningModule that pretrains ``net`` with BYOL.

    Args:
        net: the backbone, trained in place (save ``module.net.state_dict()``).
        image_size: side of the augmented views.
        optimizer: ``"sgd"`` (momentum 0.9), ``"lars"`` or ``"adamw"`` (``byol_pytorch.training.optim``).
        lr: its learning rate.
        weight_decay: its weight decay (biases and norms get none).
        moving_average_decay: initial tau of the target EMA (the README: 0.99 with SGD).
        moving_average_total_steps: steps over which tau rises to 1; None: the number
            of optimizer steps of the fit (``trainer.estimated_stepping_batches``).
        **byol_kwargs: passed on to ``BYOL`` (e.g. ``projection_hidden_size``).

    Batches are ``(images, skipped)`` as ``byol_pytorch.data.collate_images`` makes
    them: ``uint8`` images ``(B, C, S, S)`` and a count of broken files passed over.
    """

    def __init__(
        self,
        net: nn.Module,
        image_size: int,
        optimizer: str = "sgd",
        lr: float = 0.0125,
        weight_decay: float = 1e-4,
        moving_average_decay: float = 0.99,
        moving_average_total_steps: int | None = None,
        **byol_kwargs: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.learner = BYOL(
            net,
            image_size,
            moving_average_decay=moving_average_decay,
            moving_average_total_steps=moving_average_total_steps,
            **byol_kwargs,
        )
        self.skipped_files = 0

    @property
    def net(self) -> nn.Module:
        """The backbone being trained."""
        return self.learner.net

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # Read by DistributedDataParallel when Lightning wraps this module (see the
        # module docstring): the learner's list, named from here.
        return self.learner.ddp_ignored_names(prefix="learner.")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Known here: max_steps or epochs x batches, divided by the accumulation (-1 or inf: not known, an
        # iterable loader with max_epochs, and tau stays constant).
        steps = self.trainer.estimated_stepping_batches
        known = int(steps) if math.isfinite(steps) and steps >= 1 else None
        chosen = self.hparams.moving_average_total_steps  # the constructor's K, when one was given
        done = int(self.learner.ema_step)  # updates so far: a checkpoint's after fit(ckpt_path=...)
        if self.trainer.ckpt_path is not None or done == 0:  # a resume's estimate is the whole run's
            self.learner.moving_average_total_steps = chosen if chosen is not None else known
        elif known is not None:
            # a second fit of this trained module: the schedule goes on over its steps (kept, tau would reach 1
            # and the target stop, where the first fit ended or stopped early)
            self.learner.moving_average_total_steps = done + known
        hp = self.hparams
        return build_optimizer(hp.optimizer, self.learner, lr=hp.lr, weight_decay=hp.weight_decay)

    def training_step(self, batch: tuple[torch.Tensor, int], batch_idx: int) -> torch.Tensor:
        images, skipped = batch  # (B, C, S, S) uint8, already on the device
        self.skipped_files += int(skipped)
        loss = self.learner(images)  # the two views are augmented on the device
        self.log("loss", loss, prog_bar=True)
        self.log("tau", self.learner.current_decay)
        return loss

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        # Called once per optimizer step (never during gradient accumulation); the
        # closure runs training_step and backward for the last batch before stepping.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16 only
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if scaler is not None and scaler.get_scale() < scale:
            return  # GradScaler lowers its scale exactly when it skipped the step
        if self.learner.use_momentum:  # SimSiam (use_momentum=False) has no target to move
            self.learner.update_moving_average()

    def on_train_end(self) -> None:
        if self.skipped_files:
            print(f"warning: {self.skipped_files} unreadable image files were skipped on this process")


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of this example."""
    parser = argparse.ArgumentParser(
        description="BYOL pretraining with Lightning on a folder of images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="folder of images, searched recursively; no labels needed")
    parser.add_argument("--model", default="resnet18", help="any timm model name, built with pretrained=False")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (Trainer max_steps)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch and device; at least 2")
    parser.add_argument(
        "--accumulate-grad-batches", type=int, default=1, help="batches whose gradients are summed per optimizer step"
    )
    parser.add_argument("--image-size", type=int, default=96, help="side of the augmented views fed to the net")
    add_optimizer_flags(parser, per="the images per optimizer step on one device (with N devices, pass --lr)")
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
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per device")
    parser.add_argument("--accelerator", default="auto", help="Trainer accelerator: cpu, gpu, auto, ...")
    parser.add_argument("--devices", default="auto", help="Trainer devices: a count, -1 for all, or auto")
    parser.add_argument("--strategy", default="auto", help="Trainer strategy (several devices: DDP by default)")
    parser.add_argument("--precision", default="32-true", help="Trainer precision: 32-true, bf16-mixed, 16-mixed")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the shuffle and the augmentations")
    parser.add_argument("--out", default="byol_net.pt", help="where the trained backbone's state_dict is saved")
    return parser


def main(args: argparse.Namespace, **trainer_overrides: Any) -> tuple[BYOLModule, L.Trainer]:
    """Fit ``BYOLModule``, save the backbone to ``args.out`` (rank 0), return module and trainer.

    Args:
        args: parsed by ``get_args_parser()``.
        **trainer_overrides: extra ``lightning.Trainer`` arguments (e.g. ``logger=False``).
    """
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2 for BYOL's BatchNorm heads, got {args.batch_size}")
    if args.steps < 1:  # Lightning reads 0 as "stop at once" and -1 as "no limit" (1000 epochs)
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    out = Path(args.out)  # checked before training, not after it: a bad --out would throw the run away
    if out.is_dir() or any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise ValueError(f"--out {out} is a folder or lies under a file; name a file to write, e.g. a folder/net.pt")
    L.seed_everything(args.seed, workers=True, verbose=False)
    net = timm.create_model(args.model, pretrained=False)
    lr, decay = optimizer_settings(args, images_per_step=args.batch_size * args.accumulate_grad_batches)
    module = BYOLModule(
        net,
        args.image_size,
        optimizer=args.optimizer,
        lr=lr,
        weight_decay=decay,
        moving_average_decay=args.tau,
        projection_hidden_size=args.projection_hidden_size,
    )
    dataset = ImageFolder(args.data, load_size=load_size_for(args.image_size), channels=module.learner.channels)
    # Lightning adds a DistributedSampler itself under DDP (each rank its own shard).
    loader = make_loader(dataset, batch_size=args.batch_size, workers=args.workers, seed=args.seed)

    devices = int(args.devices) if str(args.devices).lstrip("-").isdigit() else args.devices
    trainer_kwargs: dict[str, Any] = dict(
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate_grad_batches,
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        precision=args.precision,
        # The example saves the backbone itself; add a logger or ModelCheckpoint as
        # usual (a checkpoint of this module holds the whole learner, target included).
        logger=False,
        enable_checkpointing=False,
    )
    trainer_kwargs.update(trainer_overrides)
    trainer = L.Trainer(**trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader)

    if trainer.is_global_zero:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            torch.save({k: v.cpu() for k, v in module.net.state_dict().items()}, tmp)  # CPU tensors: loads anywhere
            os.replace(tmp, out)  # atomic: never a half-written file under the final name
        finally:
            tmp.unlink(missing_ok=True)  # a failed save leaves no temporary file
        print(f"saved the trained {args.model} to {out}")
    return module, trainer


if __name__ == "__main__":
    main(get_args_parser().parse_args())
