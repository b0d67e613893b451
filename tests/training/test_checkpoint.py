"""Checkpoints: atomic save, weights_only load, errors for foreign files, RNG state."""

import os
import random

import numpy as np
import pytest
import torch

from byol_pytorch.training.checkpoint import (
    FORMAT,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)


def test_save_and_load_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "last.pt", {"step": 3, "learner": {"w": torch.arange(4.0)}})
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["version"] == 1 and loaded["step"] == 3
    torch.testing.assert_close(loaded["learner"]["w"], torch.arange(4.0))
    assert torch.load(path, weights_only=True)["step"] == 3
    assert sorted(os.listdir(path.parent)) == ["last.pt"]  # no temporary file left behind


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1})
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a file")  # save_checkpoint hands torch.save an open file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


class _NotAllowed:
    pass


@pytest.mark.parametrize("kind", ["text", "empty", "foreign_dict", "pickled_class", "tensor"])
def test_foreign_files_are_rejected_clearly(tmp_path, kind):
    path = tmp_path / "x.pt"
    if kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign_dict":
        torch.save({"state_dict": {}}, path)
    elif kind == "pickled_class":
        torch.save({"format": FORMAT, "obj": _NotAllowed()}, path)
    else:
        torch.save(torch.zeros(2), path)
    with pytest.raises(ValueError, match="is not a byol_pytorch checkpoint"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # sets numpy's cached gaussian
    save_checkpoint(tmp_path / "rng.pt", {"rng": get_rng_state()})
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    torch.testing.assert_close(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2] and first[3] == second[3]


def test_where_processes_cannot_be_asked_stale_temps_go_by_age(tmp_path, monkeypatch):
    import time

    from byol_pytorch import _atomic as checkpoint

    target = tmp_path / "last.pt"
    fresh = tmp_path / f".last.pt.{os.getpid() + 1}.abcd.tmp"
    old = tmp_path / f".last.pt.{os.getpid() + 2}.efgh.tmp"
    for temp in (fresh, old):
        temp.write_bytes(b"partial")
    hour_ago = time.time() - checkpoint.STALE_TEMP_SECONDS - 5
    os.utime(old, (hour_ago, hour_ago))
    monkeypatch.setattr(checkpoint, "_CAN_PROBE_PIDS", False)  # as on Windows, where signal 0 would interrupt
    assert checkpoint._pid_alive(os.getpid() + 1) is None
    assert checkpoint.remove_stale_temps(target) == [old]
    assert fresh.exists() and not old.exists()


@pytest.mark.parametrize(
    "key, value", [("step", "x"), ("total_steps", -1), ("epoch", 1.5), ("version", True), ("version", None)]
)
def test_a_count_that_is_no_count_is_a_value_error_naming_it(tmp_path, key, value):
    """Before: a hand-edited step='x' was a ValueError traceback from int() in embed, 'invalid literal' on resume."""
    path = save_checkpoint(tmp_path / "last.pt", {"step": 3, "total_steps": 10, "epoch": 0, key: value})
    with pytest.raises(ValueError, match=f"holds {key}={value!r}, not a count: the checkpoint was edited"):
        load_checkpoint(path)


def test_a_recipe_value_of_another_type_is_a_value_error_naming_it():
    from byol_pytorch.training.recipe import Recipe

    with pytest.raises(ValueError, match="the recipe's image_size is 'abc', not of type int"):
        Recipe.from_dict({"model": "resnet10t", "image_size": "abc"})
    with pytest.raises(ValueError, match="the recipe's use_batchnorm is 1, not of type bool"):
        Recipe.from_dict({"model": "resnet10t", "use_batchnorm": 1})
    recipe = Recipe.from_dict({"model": "resnet10t", "lr": 1, "in_chans": None, "tau_base": 0.99})
    assert (recipe.lr, recipe.in_chans, recipe.tau_base) == (1, None, 0.99)  # an int where a float goes is fine
