"""Drop-in for the "Distributed Training" section of lucidrains/byol-pytorch.

::

    trainer = BYOLTrainer(
        resnet, dataset=MockDataset(256, 10000), image_size=256, hidden_layer="avgpool",
        learning_rate=3e-4, num_train_steps=100_000, batch_size=16, checkpoint_every=1000,
    )
    trainer()

Same argument names and the same files (``checkpoint_folder/checkpoint.{n}.pt`` holding
``net.state_dict()``), running on this package's engine (``training/engine.py``): one process, or
``torchrun --nproc_per_node=N script.py`` for DDP (NCCL on GPUs, gloo on CPUs).
Hugging Face accelerate is not needed; ``accelerator_kwargs`` is accepted and ignored,
with a warning (use ``precision=`` and ``device=`` instead).
"""

from __future__ import annotations

import numbers
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .._atomic import atomic_write
from .._discovery import layer_by_name
from .._hidden import HiddenLayer
from .._modules import whole_number
from ..batchnorm import convert_sync_batchnorm
from ..byol import BYOL
from ..data import ShardReading, load_size_for, make_loader, open_unlabelled
from ..data.sampling import DataOrder, EpochSampler, step_batches
from ..data.shards import ShardDataset, make_shard_loader
from .distributed import broadcast_from_main, setup_distributed
from .engine import DivergedError, Engine, OptimizerStep, Periodic, TrainState, prepare_model
from .validation import BelowReference, KnnMonitor

__all__ = ["BYOLTrainer", "MockDataset"]


class MockDataset(Dataset):
    """Random images for trying the trainer out: item ``i`` is the same every time.

    Args:
        image_size: side of the square images.
        length: number of images.

    ``dataset[i]`` is a float tensor (3, image_size, image_size) in [0, 1).
    """

    def __init__(self, image_size: int, length: int):
        self.image_size = whole_number("image_size", image_size, 1)
        self.length = whole_number("length", length, 1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"MockDataset indices are ints, got {index!r}")
        index = int(index)  # numpy's too (a sampler's)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        generator = torch.Generator().manual_seed(index % self.length)
        return torch.rand(3, self.image_size, self.image_size, generator=generator)


def _images_only(batch: list) -> torch.Tensor:
    """Collate items that are images or (image, label, ...) tuples into an image batch."""
    first = batch[0]
    if isinstance(first, (tuple, list)):
        batch = [item[0] for item in batch]
    try:
        return default_collate(batch)
    except RuntimeError as error:  # the sizes are looked at only when torch could not stack the batch
        shapes = [tuple(getattr(image, "shape", ())) for image in batch]
        odd = next((i for i, shape in enumerate(shapes) if shape != shapes[0]), None)
        if odd is None:
            raise
        raise ValueError(
            f"the dataset's images differ in size ({shapes[0]} and {shapes[odd]} in one batch): a batch stacks "
            "images of one size; resize them in your dataset's __getitem__ (for example "
            "torchvision.transforms.v2.Resize((S, S))), or pass the folder's path as dataset=, which is resized"
        ) from error


def _check_items(dataset: object, channels: int) -> None:
    """A ``TypeError`` now, naming what is accepted, for a dataset whose items no batch can be made of."""
    accepted = "a map-style Dataset whose items are (C, H, W) images (tensors or arrays) or (image, label, ...) tuples"
    if isinstance(dataset, DataLoader):
        raise TypeError(f"dataset= takes the Dataset, not its DataLoader (BYOLTrainer makes its own): {accepted}")
    if isinstance(dataset, IterableDataset):
        raise TypeError(f"dataset must be {accepted}; for a stream of images pass a data spec (tar shards)")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        got = type(dataset).__name__
        raise TypeError(f"dataset must be {accepted}, or a data spec such as a folder path; got {got}")
    if len(dataset) == 0:
        return  # EpochSampler says how many images a step needs
    first = dataset[0]
    image = first[0] if isinstance(first, (tuple, list)) and first else first
    shape = tuple(getattr(image, "shape", ()))
    if isinstance(image, (torch.Tensor, np.ndarray)) and len(shape) == 3 and shape[0] in (1, 2, 3, 4, channels):
        return  # (C, H, W): a tensor, or an array the loader's collate turns into one
    what = type(image).__name__ + (f" of shape {shape}" if shape else "")
    hint = ""
    if type(image).__name__ == "Image":
        hint = "; convert PIL images with torchvision.transforms.functional.pil_to_tensor"
    elif isinstance(image, dict):
        hint = "; return the image tensor (e.g. item['image']) from your dataset's __getitem__"
    elif len(shape) == 3 and shape[-1] in (1, 3, 4):
        hint = "; (H, W, C) images need their channels first: x.permute(2, 0, 1) (a tensor) or a.transpose(2, 0, 1)"
    raise TypeError(f"dataset must be {accepted}; its first item holds a {what}{hint}")


class BYOLTrainer(nn.Module):
    """Train ``net`` with BYOL on ``dataset``; call the trainer to run it.

    Args:
        net: the backbone, trained in place.
        image_size: side of the augmented views.
        hidden_layer: the representation layer (name, module, child index, or ``"auto"``).
        learning_rate: the optimiser's constant learning rate.
        dataset: items are images (C, H, W), float or uint8, or tuples starting with one; or a
            data spec as ``byol-pytorch train --data`` takes it (a folder of images,
            ``cifar10:ROOT``, ``hf:PATH``, tar shards), opened by ``data.open_unlabelled``.
        num_train_steps: optimizer steps to take.
        batch_size: images per step and process.
        optimizer_klass: the optimiser class (default Adam, as the incumbent).
        checkpoint_every: save ``net.state_dict()`` every this many steps.
        checkpoint_folder: where ``checkpoint.{n}.pt`` files go (atomically written);
            ``checkpoint.final.pt`` holds the net at the end.
        byol_kwargs: more ``BYOL`` arguments.
        optimizer_kwargs: more optimiser arguments.
        accelerator_kwargs: accepted for compatibility and ignored.
        num_workers: data loading processes.
        device: default: this process's GPU, else the CPU.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        seed: seeds the data order and (plus the rank) the augmentations; None keeps
            the global generator as it is (offset by the rank under DDP), the data order
            then seeded by rank 0's initial seed (one order that the ranks split).
        val_data: labelled data (a spec, see ``data.labelled_split``) for a kNN monitor: the
            untouched net is measured before the first step (the reference), then every
            ``val_every`` steps and at the end; a ``UserWarning`` says when the accuracy falls
            below the reference by more than the evaluations' noise (``validation.BelowReference``).
        val_every: steps between kNN evaluations (default: ``checkpoint_every``).
    """

    step: torch.Tensor  # optimizer steps taken (a buffer, as in the incumbent)

    def __init__(
        self,
        net: nn.Module,
        *,
        image_size: int,
        hidden_layer: HiddenLayer,
        learning_rate: float,
        dataset: Dataset | str,
        num_train_steps: int,
        batch_size: int = 16,
        optimizer_klass: type[torch.optim.Optimizer] = torch.optim.Adam,
        checkpoint_every: int = 1000,
        checkpoint_folder: str = "./checkpoints",
        byol_kwargs: dict[str, Any] | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        accelerator_kwargs: dict[str, Any] | None = None,
        num_workers: int = 0,
        device: str | None = None,
        precision: str = "fp32",
        seed: int | None = None,
        val_data: str | None = None,
        val_every: int | None = None,
    ):
        super().__init__()
        num_train_steps = whole_number("num_train_steps", num_train_steps, 1, floats=True)  # 1e5 as the incumbent
        checkpoint_every = whole_number("checkpoint_every", checkpoint_every, 1, floats=True)
        batch_size = whole_number("batch_size", batch_size, 2, floats=True)
        num_workers = whole_number("num_workers", num_workers, 0)
        if val_every is not None:
            val_every = whole_number("val_every (or None: every checkpoint_every steps)", val_every, 1, floats=True)
        if seed is not None:
            seed = whole_number("seed (or None)", seed, -(2**63))
            if not -(2**62) < seed < 2**62:  # offset per rank, worker and step, it stays a 64-bit integer
                raise ValueError(f"seed must be between -2**62 and 2**62, got {seed}")
        dataset = os.fspath(dataset) if isinstance(dataset, os.PathLike) else dataset
        val_data = os.fspath(val_data) if isinstance(val_data, os.PathLike) else val_data
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
        given: object = learning_rate  # (mypy does not count float as a numbers.Real)
        if isinstance(given, bool) or not isinstance(given, (numbers.Real, torch.Tensor)):
            raise TypeError(f"learning_rate must be a number, got {learning_rate!r}")
        folder = Path(checkpoint_folder)
        if folder.exists() and not folder.is_dir():  # found now, not once the net and the data are built
            raise ValueError(f"checkpoint_folder {str(folder)!r} is a file, not a folder; choose another")
        if accelerator_kwargs:
            warnings.warn(
                "BYOLTrainer runs on byol_pytorch's own loop: accelerator_kwargs is ignored; "
                "use precision= and device=",
                stacklevel=2,
            )
        self.ctx = setup_distributed(device)
        if self.ctx.distributed and self.ctx.device.type == "cuda":
            hidden_layer = layer_by_name(net, hidden_layer)  # a BatchNorm given as the layer is replaced next
            net = convert_sync_batchnorm(net)  # a frozen BatchNorm stays frozen
        self.net = net
        self.byol = BYOL(net, image_size=image_size, hidden_layer=hidden_layer, **(byol_kwargs or {}))
        self.byol.to(self.ctx.device)
        self.optimizer = optimizer_klass(  # type: ignore[call-arg]
            self.byol.parameters(), lr=learning_rate, **(optimizer_kwargs or {})
        )
        # One data order for every rank (each process's own initial seed would split nothing): rank 0's.
        base_seed = seed if seed is not None else broadcast_from_main(self.ctx, torch.initial_seed)
        self.sampler, self.dataloader = self._data(dataset, image_size, batch_size, num_workers, base_seed)
        self.num_train_steps, self.checkpoint_every = int(num_train_steps), int(checkpoint_every)
        self.checkpoint_folder = folder
        self.checkpoint_folder.mkdir(parents=True, exist_ok=True)
        self.precision, self.seed = precision, seed
        self.val_every = int(val_every if val_every is not None else checkpoint_every)
        self.monitor: KnnMonitor | None = None
        if val_data is not None:
            channels = 1 if self.byol.channels == 1 else 3

            def open_monitor() -> None:  # on rank 0 alone, the others waiting on the long group
                self.monitor = KnnMonitor(val_data, image_size, channels, self.ctx.device, workers=num_workers)

            broadcast_from_main(self.ctx, open_monitor)  # an error reaches every rank
        self._val_data = val_data
        self.knn: list[tuple[int, float]] = []  # (step, kNN accuracy); step 0 is the untouched net
        self._validating = val_data is not None  # every rank: the monitor runs on rank 0, the others wait
        self._below: BelowReference | None = None
        self._called = False  # the views' generator is seeded at the first call (``_seed_once``)
        self.register_buffer("step", torch.tensor(0))

    def _data(
        self, dataset: Dataset | str, image_size: int, batch_size: int, workers: int, seed: int
    ) -> tuple[DataOrder, DataLoader]:
        """The data order and the loader of a dataset, or of a data spec opened by ``data.open_unlabelled``."""
        ctx, pin = self.ctx, self.ctx.device.type == "cuda"
        if isinstance(dataset, str):
            reading = ShardReading(batch_size, ctx.rank, ctx.world_size, workers, seed % 2**31)
            channels = 1 if self.byol.channels == 1 else 3
            dataset = open_unlabelled(dataset, load_size_for(image_size), channels, shards=reading)
            if isinstance(dataset, ShardDataset):
                return dataset, make_shard_loader(dataset, pin_memory=pin)
        _check_items(dataset, self.byol.channels)
        sampler = EpochSampler(len(dataset), batch_size, ctx.rank, ctx.world_size, seed)  # type: ignore[arg-type]
        loader = make_loader(
            dataset,
            batch_size,
            workers,
            sampler=sampler,
            drop_last=True,
            seed=(seed * 1000 + ctx.rank) % 2**63,
            collate_fn=_images_only,
            pin_memory=pin,
        )
        return sampler, loader

    def print(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.ctx.is_main:
            print(message, flush=True)

    def save(self, name: str) -> Path:
        """Write ``net.state_dict()`` to ``checkpoint_folder/name`` atomically (rank 0)."""
        path = self.checkpoint_folder / name
        if self.ctx.is_main:
            state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
            atomic_write(path, lambda temp: torch.save(state, temp))
        self.ctx.barrier()
        return path

    def forward(self) -> dict[str, float]:
        """Train for ``num_train_steps`` steps, after those already taken.

        A second call trains ``num_train_steps`` more, continuing the step count (and the
        ``checkpoint.{n}.pt`` numbering), the data order, the EMA schedule and the random draws
        (a cosine schedule, ``byol_kwargs={"moving_average_total_steps": K}``, that the call would
        run past is extended to its end: past K, tau would be 1 and the target would stop).
        ``state_dict()`` holds all of it but the draws (the learner with its target network and
        EMA step, the step count, the optimiser's state, the kNN figures): a trainer built the same
        way in another process continues after ``load_state_dict(torch.load(path))``, its views
        drawn from a seed that holds the step (the data order continues only when both were
        given the same ``seed=``; None draws another order).

        Returns:
            ``{"steps": steps taken in all (``trainer.step``), "loss": last logged mean loss}``;
            with ``val_data``, also ``"knn"`` (the last evaluation's accuracy) and
            ``"knn_reference"`` (the untouched net's), on every process (rank 0 evaluates and
            sends them).

        Raises:
            FloatingPointError: the loss turned non-finite (lower the learning rate).
        """
        ctx = self.ctx
        start = int(self.step)
        self._seed_once(start)
        total, done = self.byol.moving_average_total_steps, int(self.byol.ema_step)
        if total is not None and done + self.num_train_steps > total:  # a second call past the EMA's K
            self.byol.moving_average_total_steps = done + self.num_train_steps  # tau at 1 would stop the target
        model = prepare_model(self.byol, ctx)
        scaler = torch.amp.GradScaler(ctx.device.type) if self.precision == "fp16" else None
        step = OptimizerStep(self.byol, model, self.optimizer, None, self.precision, ctx.device, scaler)
        engine = Engine(step, ctx, catch_signals=False)  # Ctrl-C interrupts, as in the incumbent
        per_epoch = self.sampler.batches_per_epoch
        state = TrainState(  # from the steps taken so far: one data order, continued
            step=start, total=start + self.num_train_steps, epoch=start // per_epoch, position=start % per_epoch
        )
        every = self.checkpoint_every

        def checkpoint(s: TrainState) -> None:
            self.step.fill_(s.step)
            self.save(f"checkpoint.{(s.step - 1) // every}.pt")

        hooks = [
            # the loss reported: the mean since the last read-back
            Periodic(TrainState.take_interval, every=engine.check_every, at_end=True),
            # checkpoint.{n}.pt after the steps whose 0-based index is a multiple of
            # checkpoint_every (1, every + 1, ...), as the incumbent counts
            Periodic(checkpoint, when=lambda s: s.stepped and (s.step - 1) % every == 0),
        ]
        hooks += self._monitor_hooks()
        batches = step_batches(self.dataloader, self.sampler, state.epoch, state.position, 1)
        try:
            engine.run(batches, state, hooks)
        except DivergedError as error:
            advice = "" if error.bad_input else "; lower the learning_rate or use precision='fp32'/'bf16'"
            raise FloatingPointError(f"{error}{advice}") from None
        self.step.fill_(state.step)
        self.save("checkpoint.final.pt")
        self.print("training complete")
        result: dict[str, Any] = {"steps": state.step, "loss": state.loss}
        if self._validating:  # rank 0 evaluates: every rank gets its figures (and ``knn``), so code reads them anywhere
            self.knn[:] = broadcast_from_main(ctx, lambda: list(self.knn))
            result.update(knn=self.knn[-1][1], knn_reference=self.knn[0][1])
        return result

    def _seed_once(self, start: int) -> None:
        """Seed the views' random draws at this trainer's first call; a later call continues them.

        A trainer that starts after steps taken elsewhere (``load_state_dict``) draws from a seed that
        also holds the step, so it does not repeat the first run's draws.
        """
        if self._called:
            return
        self._called = True
        rank = self.ctx.rank
        if self.seed is not None:
            torch.manual_seed(self.seed + rank + start * 1_000_003)
        elif self.ctx.distributed:
            torch.manual_seed((torch.initial_seed() + rank) % 2**63)

    def get_extra_state(self) -> dict[str, Any]:
        """What ``state_dict()`` holds beside the modules' tensors: the optimiser's state and the kNN figures."""
        return {"optimizer": self.optimizer.state_dict(), "knn": [list(pair) for pair in self.knn]}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        """A state saved before 1.2.0 holds no optimiser state (``_extra_state``): it loads, with a warning."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        key = prefix + "_extra_state"
        if key in missing_keys:
            missing_keys.remove(key)
            warnings.warn(
                "this BYOLTrainer state holds no optimiser state (saved before 1.2.0): the optimiser starts afresh",
                UserWarning,
                stacklevel=3,
            )

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ValueError("this state was not saved by BYOLTrainer.state_dict(): it holds no optimiser state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.knn[:] = [(int(step), float(accuracy)) for step, accuracy in state.get("knn", [])]

    def _evaluate(self, step: int) -> None:
        if self.monitor is not None:
            accuracy = self.monitor(self.byol)
            self.knn.append((step, accuracy))
            self.print(f"step {step}: kNN accuracy {accuracy:.4f}" + (" (untouched net)" if step == 0 else ""))
            missing = self.monitor.missing_warning(str(self._val_data), once=True)  # the accuracy is over the others
            if missing:
                warnings.warn(missing, UserWarning, stacklevel=2)
            if step > 0:
                self._warn_below(step, accuracy)
        self.ctx.wait_for_main()

    def _warn_below(self, step: int, accuracy: float) -> None:
        if self._below is None:
            self._below = BelowReference(self.knn[0][1], self.monitor.queries_scored if self.monitor else 0)
        gap = self._below.check(accuracy)
        if gap is not None:
            warnings.warn(
                f"the kNN accuracy {accuracy:.4f} at step {step} is {gap:.4f} below the untouched net's "
                f"{self._below.reference:.4f}, more than the evaluations' noise: training is losing what the net had; "
                "try another optimizer (SGD with momentum for BatchNorm convnets), a lower learning_rate, or a warm-up",
                UserWarning,
                stacklevel=2,
            )

    def _monitor_hooks(self) -> list[Periodic]:
        """The kNN monitor: the untouched net now (the reference), then every ``val_every`` steps and at the end."""
        if not self._validating:
            return []
        if not self.knn:  # the reference, once: a later call (or a loaded state) keeps the untouched net's
            self._evaluate(0)
        return [Periodic(lambda s: self._evaluate(s.step), every=self.val_every, at_end=True)]
