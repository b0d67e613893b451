"""The typed recipe: plain values in checkpoints, every checkpoint written so far read back and resumed.

``tests/fixtures/checkpoints`` holds a 2-step run of the fixture CNN written by 1.1.0 and one
written by main before the recipe became a dataclass (commit 4a0a166); ``make_checkpoints.py``
there made them. Resuming either to step 4 gives the loss both versions gave when resumed the
same way before the refactor (4.917543, read off their metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol_pytorch.app import cli
from byol_pytorch.training.checkpoint import load_checkpoint
from byol_pytorch.training.models import build_learner
from byol_pytorch.training.recipe import VIEW_DEFAULTS, Recipe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
LOSS_AT_STEP_4 = 4.917543  # both fixtures resumed to step 4, before the refactor


@pytest.fixture(scope="module", autouse=True)
def fixture_model():
    sys.path.insert(0, str(FIXTURES))
    import tiny_model  # noqa: F401  (registers byol_fixture_cnn in timm)

    yield
    sys.path.remove(str(FIXTURES))


def test_the_recipe_is_frozen_and_saved_as_plain_values():
    recipe = Recipe(model="resnet18", image_size=64, lr=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.lr = 0.2  # type: ignore[misc]
    plain = recipe.to_dict()
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in plain.values())
    assert Recipe.from_dict(plain) == recipe and recipe.replace(lr=0.2).lr == 0.2 and recipe.lr == 0.1


def test_keys_an_old_checkpoint_lacks_take_what_that_version_ran_with():
    old = {"model": "resnet18", "image_size": 32, "lr": 0.05, "recipe": None, "data": "photos", "workers": 4}
    recipe = Recipe.from_dict(old)
    assert recipe.recipe == "paper" and recipe.view_values() == VIEW_DEFAULTS and recipe.lars_trust == 1e-3
    assert not recipe.lars_clip and recipe.lr == 0.05 and recipe.image_size == 32
    with pytest.raises(ValueError, match="'model' is missing"):
        Recipe.from_dict({"image_size": 32})
    with pytest.raises(TypeError, match="mapping"):
        Recipe.from_dict(["model"])  # type: ignore[arg-type]


@pytest.mark.parametrize("fixture", ["v1.1.0.pt", "main-4a0a166.pt"])
def test_fixture_checkpoints_read_into_a_recipe_and_a_learner(fixture):
    checkpoint = load_checkpoint(FIXTURES / fixture)
    recipe = Recipe.from_dict(checkpoint["args"])
    assert recipe.model == "byol_fixture_cnn" and recipe.image_size == 8 and recipe.projection_size == 4
    learner = build_learner(recipe)
    learner.load_state_dict(checkpoint["learner"])
    assert learner.representation_size == 4 and learner.has_target
    target = learner.init_target()
    assert target is not None
    saved = {k[len("target_encoder.") :]: v for k, v in checkpoint["learner"].items() if k.startswith("target_enc")}
    assert saved and all(torch.equal(target.state_dict()[k], v) for k, v in saved.items())


def _images(root: Path) -> Path:
    """The 8 images the fixtures were trained on (make_checkpoints.py draws them the same way)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("fixture", ["v1.1.0.pt", "main-4a0a166.pt"])
def test_fixture_checkpoints_resume_as_before_the_refactor(fixture, tmp_path):
    images, out = _images(tmp_path / "images"), tmp_path / "run"
    argv = ["train", "--data", str(images), "--out", str(out), "--resume", str(FIXTURES / fixture), "--max-steps", "4"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["loss"] == pytest.approx(LOSS_AT_STEP_4, abs=1e-6)
    saved = load_checkpoint(out / "last.pt")
    assert Recipe.from_dict(saved["args"]).recipe == "paper" and saved["step"] == 4
    assert torch.isfinite(saved["learner"]["online_encoder.net.fc.weight"]).all()
