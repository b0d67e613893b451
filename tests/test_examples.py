"""The three examples in examples/ run end to end on a tiny image folder and train.

Each example's ``main()`` is imported by file path and run with tiny sizes. The checks:
the saved backbone loads strictly into a fresh timm model, its trained layers moved
away from the initial weights while the classifier after the hidden layer (no gradient)
did not, no temporary file is left behind, and the target network took exactly one EMA
step per optimizer step, also with gradient accumulation (more batches than steps).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import byol_pytorch
from byol_pytorch import BYOL

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL = "resnet10t"
SEED = 0
TINY = [
    "--model",
    MODEL,
    "--image-size",
    "32",
    "--batch-size",
    "2",
    "--workers",
    "0",
    "--projection-hidden-size",
    "64",
    "--seed",
    str(SEED),
    "--lr",  # the default (0.05 x 2/256 with SGD) leaves some weights within float rounding in 3 steps
    "0.05",
]


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"byol_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """8 small images, PNG and JPEG, RGB and grayscale, one nested: 4 batches of 2."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "nested").mkdir()
    for i in range(8):
        pixels = rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if i % 4 == 3:
            image = image.convert("L")
        if i % 2:
            image.save(root / f"image_{i}.png")
        else:
            image.save(root / "nested" / f"image_{i}.jpg", quality=90)
    return root


@pytest.fixture
def forward_calls(monkeypatch) -> list:
    """Counts BYOL training forwards (one per batch, whoever calls them)."""
    calls: list = []
    original = BYOL.forward

    def counting(self, x, *args, **kwargs):
        if not kwargs.get("return_embedding", False):
            calls.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(BYOL, "forward", counting)
    return calls


def _assert_trained_backbone(path: Path) -> None:
    """The file at `path` is a full state_dict of MODEL, trained but for its classifier."""
    assert sorted(os.listdir(path.parent)) == [path.name], "a temporary file was left next to the output"
    state = torch.load(path, weights_only=True)
    fresh = timm.create_model(MODEL, pretrained=False)
    fresh.load_state_dict(state, strict=True)

    torch.manual_seed(SEED)  # the examples seed before building the net: same initial weights
    initial = timm.create_model(MODEL, pretrained=False).state_dict()
    prefix = fresh.pretrained_cfg["classifier"]  # "fc"
    classifier_names = {f"{prefix}.{n}" for n, _ in fresh.get_classifier().named_parameters()}
    assert classifier_names and classifier_names <= state.keys()
    for name in classifier_names:  # after the hidden layer: no gradient, no weight decay
        assert torch.equal(state[name], initial[name]), f"{name} changed"
    trained = [n for n, p in fresh.named_parameters() if n not in classifier_names]
    changed = [n for n in trained if not torch.equal(state[n], initial[n])]
    assert len(changed) == len(trained), f"not trained: {sorted(set(trained) - set(changed))[:5]}"


def test_own_training_loop(image_folder, tmp_path, forward_calls):
    example = _load_example("own_training_loop")
    out = tmp_path / "out" / "net.pt"
    args = example.get_args_parser().parse_args(
        ["--data", str(image_folder), "--steps", "3", "--log-every", "1", "--out", str(out), *TINY]
    )
    learner = example.main(args)

    assert forward_calls == [2, 2, 2]
    assert int(learner.ema_step) == 3
    assert learner.moving_average_total_steps == 3
    assert learner.current_decay == 1.0  # the cosine schedule ran to its end
    _assert_trained_backbone(out)


def test_own_training_loop_rejects_batch_of_one(image_folder, tmp_path):
    example = _load_example("own_training_loop")
    args = example.get_args_parser().parse_args(
        ["--data", str(image_folder), "--steps", "1", "--out", str(tmp_path / "net.pt"), *TINY, "--batch-size", "1"]
    )
    with pytest.raises(ValueError, match="at least 2"):
        example.main(args)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_module(image_folder, tmp_path, forward_calls, accumulate):
    pytest.importorskip("lightning")
    example = _load_example("lightning_module")
    out = tmp_path / "out" / "net.pt"
    args = example.get_args_parser().parse_args(
        [
            "--data",
            str(image_folder),
            "--steps",
            "2",
            "--accumulate-grad-batches",
            str(accumulate),
            "--accelerator",
            "cpu",
            "--devices",
            "1",
            "--out",
            str(out),
            *TINY,
        ]
    )
    module, trainer = example.main(
        args, enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False
    )

    learner = module.learner
    assert len(forward_calls) == 2 * accumulate  # batches seen
    assert trainer.global_step == 2  # optimizer steps
    assert int(learner.ema_step) == 2, "the target must move once per optimizer step, not per batch"
    assert learner.moving_average_total_steps == 2  # trainer.estimated_stepping_batches
    _assert_trained_backbone(out)
    if accumulate == 1:  # a probe: a second fit kept the first fit's total, so tau stayed 1 and the target still
        import lightning

        target = [t.clone() for t in learner.target_encoder.parameters()]
        again = lightning.Trainer(
            max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again.fit(module, trainer.train_dataloader)
        assert not [w for w in caught if "past moving_average_total_steps" in str(w.message)]
        assert int(learner.ema_step) == 5 and learner.moving_average_total_steps == 2 + 3
        assert any(not torch.equal(a, b) for a, b in zip(target, learner.target_encoder.parameters()))
        # the review: a first fit that ended before its K (early stopping) kept it for the second fit too
        learner.moving_average_total_steps = 50
        again = lightning.Trainer(
            max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path / "f3"
        )
        again.fit(module, trainer.train_dataloader)
        assert int(learner.ema_step) == 7 and learner.moving_average_total_steps == 5 + 2
        # a resume of a checkpoint asking for more steps: its estimate is the whole run's (the module in memory)
        checkpoint = next((tmp_path / "f3").rglob("*.ckpt"))
        longer = lightning.Trainer(
            max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path / "f4"
        )
        longer.fit(module, trainer.train_dataloader, ckpt_path=checkpoint)
        assert longer.global_step == 4 and learner.moving_average_total_steps == 4 and int(learner.ema_step) == 9
        # an iterable loader with max_epochs: Lightning estimates -1 steps, which left K -1 (tau 1 from the start)
        stream = example.BYOLModule(timm.create_model(MODEL, pretrained=False), 32, lr=1e-3, projection_hidden_size=64)

        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                for _ in range(2):
                    yield torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), 0

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lightning.Trainer(
                max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False
            ).fit(stream, torch.utils.data.DataLoader(Stream(), batch_size=None))
        assert not [w for w in caught if "past moving_average_total_steps" in str(w.message)]
        assert stream.learner.moving_average_total_steps is None and int(stream.learner.ema_step) == 2

    # DDP wraps the LightningModule: the learner's ignore list is forwarded with its prefix,
    # and names the classifier and every target tensor that exists.
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    names = dict(module.named_parameters()) | dict(module.named_buffers())
    assert ignored <= names.keys()
    assert {f"learner.{n}" for n in learner.unused_parameter_names} <= ignored
    assert {n for n in names if n.startswith("learner.target_encoder.")} <= ignored


def test_lightning_resumes_a_module_whose_optimizer_takes_its_own_parameters(tmp_path):
    """A LightningModule as users write one: Adam(self.parameters()), built before the first step and, on a resume,
    after Lightning loaded the weights. Before: the target made by that load doubled the list and the optimiser
    state failed to load. The example's module with use_momentum=False (SimSiam) trains: before, its
    optimizer_step called update_moving_average(), an error without a target."""
    lightning = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.learner = BYOL(timm.create_model(MODEL, pretrained=False), 32, projection_hidden_size=64)
            self.counts: list[int] = []

        def training_step(self, batch, batch_idx):
            return self.learner(batch[0])

        def on_train_batch_end(self, *args) -> None:
            self.learner.update_moving_average()

        def configure_optimizers(self):
            self.counts.append(len(list(self.parameters())))
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    data = DataLoader(TensorDataset(torch.rand(16, 3, 32, 32)), batch_size=8)
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    first = Module()
    lightning.Trainer(max_steps=2, default_root_dir=tmp_path, **quiet).fit(first, data)
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    resumed = Module()
    lightning.Trainer(max_steps=4, default_root_dir=tmp_path / "resumed", **quiet).fit(
        resumed, data, ckpt_path=checkpoint
    )
    assert resumed.counts == first.counts and int(resumed.learner.ema_step) == 4

    example = _load_example("lightning_module")
    simsiam = example.BYOLModule(timm.create_model(MODEL, pretrained=False), 32, lr=1e-3, use_momentum=False)
    images = TensorDataset(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    batches = DataLoader(images, batch_size=8, collate_fn=lambda items: (torch.stack([i[0] for i in items]), 0))
    trainer = lightning.Trainer(max_steps=2, enable_checkpointing=False, **quiet)
    trainer.fit(simsiam, batches)
    assert trainer.global_step == 2 and simsiam.learner.target_encoder is None


def test_lightning_module_ddp_two_processes(image_folder, tmp_path):
    # Without the forwarded ignore list, DDP (find_unused_parameters=False) stops at the
    # second step: the classifier got no gradient.
    pytest.importorskip("lightning")
    out = tmp_path / "out" / "net.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(byol_pytorch.__file__).parents[1]))
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "lightning_module.py"),
            "--data",
            str(image_folder),
            "--steps",
            "2",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--out",
            str(out),
            *TINY,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_trained_backbone(out)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; leave none behind for later tests."""
    state = pytest.importorskip("accelerate.state")
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_accelerate_train(image_folder, tmp_path, forward_calls, fresh_accelerate_state, accumulate):
    example = _load_example("accelerate_train")
    out = tmp_path / "out" / "net.pt"
    args = example.get_args_parser().parse_args(
        [
            "--data",
            str(image_folder),
            "--steps",
            "2",
            "--gradient-accumulation-steps",
            str(accumulate),
            "--out",
            str(out),
            *TINY,
        ]
    )
    learner = example.main(args)

    assert isinstance(learner, BYOL)  # unwrapped
    assert len(forward_calls) == 2 * accumulate  # batches seen
    assert int(learner.ema_step) == 2, "the target must move once per optimizer step, not per batch"
    assert learner.current_decay == 1.0
    _assert_trained_backbone(out)


@pytest.mark.parametrize(
    "name, flags, message",
    [
        ("own_training_loop", ["--log-every", "0"], "--log-every must be at least 1, got 0"),
        ("accelerate_train", ["--log-every", "0"], "--log-every must be at least 1, got 0"),
        ("accelerate_train", ["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be at least"),
        ("lightning_module", ["--steps", "0"], "--steps must be at least 1, got 0"),
        ("lightning_module", ["--steps", "-1"], "--steps must be at least 1, got -1"),
        ("own_training_loop", ["--out", "FILE/net.pt"], "lies under a file"),
        ("accelerate_train", ["--out", "DIR"], "is a folder or lies under a file"),
        ("lightning_module", ["--out", "DIR"], "is a folder or lies under a file"),
    ],
)
def test_examples_refuse_bad_flags_before_training(name, flags, message, image_folder, tmp_path, forward_calls):
    """A probe of the examples' flags: Lightning's --steps 0 saved the untrained net as trained and -1 ran 1000
    epochs; --log-every 0 and --gradient-accumulation-steps 0 ended in ZeroDivisionError mid-run; an --out under a
    file or naming a folder failed only after the whole run (its weights lost)."""
    if name != "own_training_loop":
        pytest.importorskip("lightning" if name == "lightning_module" else "accelerate")
    (tmp_path / "FILE").write_text("a file")
    (tmp_path / "DIR").mkdir()
    flags = [str(tmp_path / f) if f.startswith(("FILE", "DIR")) else f for f in flags]
    example = _load_example(name)
    argv = ["--data", str(image_folder), "--steps", "2", "--out", str(tmp_path / "net.pt"), *TINY, *flags]
    if name == "lightning_module":
        argv += ["--accelerator", "cpu", "--devices", "1"]
    with pytest.raises(ValueError, match=message):
        example.main(example.get_args_parser().parse_args(argv))
    assert not forward_calls  # refused before the first step


@pytest.mark.parametrize("name", ["accelerate_train", "lightning_module"])
def test_a_failed_save_leaves_no_temporary_file(name, image_folder, tmp_path, monkeypatch, fresh_accelerate_state):
    """A probe: a save that failed left a full-size hidden .tmp file next to --out (the own loop cleaned up)."""
    pytest.importorskip("lightning" if name == "lightning_module" else "accelerate")
    example = _load_example(name)
    out = tmp_path / "out" / "net.pt"
    argv = ["--data", str(image_folder), "--steps", "1", "--out", str(out), *TINY]
    if name == "lightning_module":
        argv += ["--accelerator", "cpu", "--devices", "1"]
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)  # the temporary file is written, then the disk fills
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full_disk)
    overrides = dict(enable_progress_bar=False, enable_model_summary=False) if name == "lightning_module" else {}
    with pytest.raises(OSError, match="No space left"):
        example.main(example.get_args_parser().parse_args(argv), **overrides)
    assert os.listdir(out.parent) == []
