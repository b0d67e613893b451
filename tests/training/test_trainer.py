"""The drop-in BYOLTrainer / MockDataset of lucidrains/byol-pytorch's "Distributed Training" section."""

import inspect
import warnings
from pathlib import Path

import pytest
import torch

from byol_pytorch.training.trainer import BYOLTrainer, MockDataset


def test_mock_dataset_is_random_images_stable_per_index():
    dataset = MockDataset(16, 5)
    assert len(dataset) == 5
    image = dataset[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() < 1 and image.std() > 0.2
    assert torch.equal(image, dataset[2]) and not torch.equal(image, dataset[3])
    with pytest.raises(IndexError, match="index 5 out of range for 5 images"):
        dataset[5]


def test_signature_keeps_the_incumbent_argument_names():
    names = inspect.signature(BYOLTrainer).parameters
    for name in (
        "net",
        "image_size",
        "hidden_layer",
        "learning_rate",
        "dataset",
        "num_train_steps",
        "batch_size",
        "optimizer_klass",
        "checkpoint_every",
        "checkpoint_folder",
        "byol_kwargs",
        "optimizer_kwargs",
        "accelerator_kwargs",
    ):
        assert name in names
    assert names["batch_size"].default == 16 and names["checkpoint_every"].default == 1000
    assert names["checkpoint_folder"].default == "./checkpoints"


def test_trainer_trains_and_checkpoints_the_net(tmp_path, make_cnn):
    net = make_cnn()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = BYOLTrainer(
        net,
        dataset=MockDataset(16, 12),
        image_size=16,
        hidden_layer=-2,
        learning_rate=1e-2,
        num_train_steps=5,
        batch_size=4,
        checkpoint_every=2,
        checkpoint_folder=str(tmp_path / "ckpt"),
        byol_kwargs=dict(projection_size=16, projection_hidden_size=32),
        seed=0,
    )
    result = trainer()
    assert result["steps"] == 5 and 0 <= result["loss"] <= 8
    assert int(trainer.step) == 5 and int(trainer.byol.ema_step) == 5  # one EMA update per optimizer step
    # As the incumbent: after step indices 0, 2, 4 -> checkpoint.0/1/2.pt; ours adds checkpoint.final.pt.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "checkpoint.0.pt",
        "checkpoint.1.pt",
        "checkpoint.2.pt",
        "checkpoint.final.pt",
    ]
    final = torch.load(tmp_path / "ckpt" / "checkpoint.final.pt", weights_only=True)
    fresh = make_cnn()
    fresh.load_state_dict(final, strict=True)
    for name, value in net.state_dict().items():
        assert torch.equal(final[name], value)
    assert not torch.equal(final["0.weight"], before["0.weight"])  # the user's net was trained in place


def test_trainer_accepts_tuples_and_warns_on_accelerator_kwargs(tmp_path, make_cnn):
    class Labelled(MockDataset):
        def __getitem__(self, index):
            return super().__getitem__(index), index % 2

    with pytest.warns(UserWarning, match="accelerator_kwargs is ignored"):
        trainer = BYOLTrainer(
            make_cnn(),
            dataset=Labelled(16, 8),
            image_size=16,
            hidden_layer="auto",
            learning_rate=1e-3,
            num_train_steps=2,
            batch_size=4,
            checkpoint_every=1000,
            checkpoint_folder=str(tmp_path),
            byol_kwargs=dict(projection_size=16, projection_hidden_size=32),
            accelerator_kwargs=dict(cpu=True),
        )
    assert trainer()["steps"] == 2


def _small_trainer(tmp_path, make_cnn, dataset, batch_size=4, steps=2, **options) -> BYOLTrainer:
    return BYOLTrainer(
        make_cnn(),
        dataset=dataset,
        image_size=16,
        hidden_layer=-2,
        learning_rate=1e-3,
        num_train_steps=steps,
        batch_size=batch_size,
        checkpoint_folder=str(tmp_path),
        **options,
    )


def test_a_net_handed_over_in_eval_mode_is_trained_in_train_mode(tmp_path, make_cnn, recwarn):
    """Before: a net in eval mode (from_pretrained() returns one) trained with its BatchNorm statistics frozen."""
    trainer = _small_trainer(tmp_path, make_cnn, MockDataset(16, 8))
    net = trainer.byol.net.eval()
    before = net[1].running_mean.clone()
    assert trainer()["steps"] == 2
    assert net.training and not torch.equal(before, net[1].running_mean)
    assert not [w for w in recwarn if "eval mode" in str(w.message)]
    target = trainer.byol.target_encoder  # copied before the loop (init_target): in train mode too (a review)
    assert target is not None and all(m.training for m in target.modules())


def test_a_net_in_train_mode_keeps_its_layers_put_in_eval_mode(tmp_path, make_cnn):
    """A review caught the fix above putting every layer in train mode: a BatchNorm frozen with bn.eval() moved."""
    trainer = _small_trainer(tmp_path, make_cnn, MockDataset(16, 8))
    net = trainer.byol.net
    net[1].eval()  # the usual way to keep one BatchNorm's statistics
    before = net[1].running_mean.clone()
    assert trainer()["steps"] == 2
    assert not net[1].training and torch.equal(before, net[1].running_mean)


def test_trainer_rejects_a_batch_of_one(tmp_path, make_cnn):
    with pytest.raises(ValueError, match="batch_size"):
        _small_trainer(tmp_path, make_cnn, MockDataset(16, 8), batch_size=1)


@pytest.mark.parametrize("val_every", [0, -5])
def test_trainer_rejects_a_val_every_below_one(tmp_path, make_cnn, val_every):
    """Before: 0 silently became checkpoint_every, and -5 was kept."""
    with pytest.raises(
        ValueError, match=rf"val_every \(or None: every checkpoint_every steps\) must be at least 1, got {val_every}"
    ):
        _small_trainer(tmp_path, make_cnn, MockDataset(16, 8), val_every=val_every)


class _Items(torch.utils.data.Dataset):
    def __init__(self, make):
        self.make = make

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return self.make(index)


@pytest.mark.parametrize(
    "dataset, match",
    [
        (_Items(lambda i: __import__("PIL.Image").Image.new("RGB", (16, 16))), "holds a Image; convert PIL images"),
        (_Items(lambda i: {"image": torch.rand(3, 16, 16), "label": 0}), "holds a dict; return the image tensor"),
        (torch.utils.data.DataLoader(MockDataset(16, 8), batch_size=4), "takes the Dataset, not its DataLoader"),
        (_Items(lambda i: torch.rand(16, 16)), r"holds a Tensor of shape \(16, 16\)"),
        (_Items(lambda i: torch.rand(16, 16, 3)), r"\(H, W, C\) images need their channels first"),
    ],
)
def test_datasets_no_batch_can_be_made_of_are_refused_at_construction(tmp_path, make_cnn, dataset, match):
    with pytest.raises(TypeError, match=match):
        _small_trainer(tmp_path, make_cnn, dataset)


def test_channel_first_arrays_train_as_before(tmp_path, make_cnn):
    import numpy as np

    dataset = _Items(lambda i: (np.random.default_rng(i).random((3, 16, 16), dtype=np.float32), i % 2))
    assert _small_trainer(tmp_path, make_cnn, dataset)()["steps"] == 2


def test_nan_input_is_not_blamed_on_the_learning_rate(tmp_path, make_cnn):
    images = torch.rand(8, 3, 16, 16)
    images[3, 0, 0, 0] = float("nan")
    trainer = _small_trainer(tmp_path, make_cnn, torch.utils.data.TensorDataset(images), steps=4)
    with pytest.raises(FloatingPointError, match="contained NaN or Inf values") as info:
        trainer()
    assert "learning_rate" not in str(info.value)


def _trainer(make_cnn, tmp_path, steps, folder="ckpt", **kwargs):
    torch.manual_seed(3)  # the same initial weights for every trainer of a test
    return BYOLTrainer(
        make_cnn(),
        dataset=MockDataset(16, 12),  # 3 batches per epoch: 4 steps cross an epoch
        image_size=16,
        hidden_layer=-2,
        learning_rate=1e-2,
        num_train_steps=steps,
        batch_size=4,
        checkpoint_every=2,
        checkpoint_folder=str(tmp_path / folder),
        byol_kwargs=dict(projection_size=16, projection_hidden_size=32),
        seed=0,
        **kwargs,
    )


def test_a_second_call_continues_the_run_as_one_longer_call_would(tmp_path, make_cnn):
    """Before: a second call started again at step 0 (the same data order, the same draws, checkpoint.0.pt
    written again) while the EMA went on counting, and returned steps 4 for 8 steps taken."""
    whole = _trainer(make_cnn, tmp_path, 8, "whole")
    assert whole()["steps"] == 8
    halves = _trainer(make_cnn, tmp_path, 4, "halves")
    assert halves()["steps"] == 4
    assert halves()["steps"] == 8 and int(halves.step) == 8 and int(halves.byol.ema_step) == 8
    for name, value in whole.byol.state_dict().items():
        torch.testing.assert_close(halves.byol.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert (
        sorted(p.name for p in (tmp_path / "halves").iterdir())
        == sorted(p.name for p in (tmp_path / "whole").iterdir())
        == ["checkpoint.0.pt", "checkpoint.1.pt", "checkpoint.2.pt", "checkpoint.3.pt", "checkpoint.final.pt"]
    )


def test_a_second_call_extends_a_cosine_schedule_it_would_run_past(tmp_path, make_cnn):
    """The review: with a K of one call's steps, a second call's updates were all past it (tau 1, the target still);
    a K both calls fit in is kept, and two halves still make the whole run."""
    whole, halves, short = (_trainer(make_cnn, tmp_path, n, name) for n, name in ((8, "w"), (4, "h"), (4, "s")))
    whole.byol.moving_average_total_steps = halves.byol.moving_average_total_steps = 8
    short.byol.moving_average_total_steps = 4
    whole()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        halves(), halves()
        short()
        before = [t.clone() for t in short.byol.target_encoder.parameters()]
        short()
    assert not [w for w in caught if "past moving_average_total_steps" in str(w.message)]
    assert halves.byol.moving_average_total_steps == 8 and short.byol.moving_average_total_steps == 8
    for name, value in whole.byol.state_dict().items():
        torch.testing.assert_close(halves.byol.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(before, short.byol.target_encoder.parameters()))


def test_state_dict_carries_a_run_to_another_trainer(tmp_path, make_cnn):
    """The trainer's state_dict holds the learner (target network, EMA step), the step count and the optimiser,
    so a trainer built the same way goes on: the data order continues, only the views' draws differ."""
    first = _trainer(make_cnn, tmp_path, 4, "first")
    first()
    path = tmp_path / "trainer.pt"
    torch.save(first.state_dict(), path)
    second = _trainer(make_cnn, tmp_path, 4, "second")
    second.load_state_dict(torch.load(path, weights_only=True))
    assert second.byol.has_target and int(second.byol.ema_step) == 4
    target = second.byol.init_target()  # the saved target, copied in at the next step
    assert target is not None and first.byol.target_encoder is not None
    for name, value in first.byol.target_encoder.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert second.optimizer.state_dict()["state"].keys() == first.optimizer.state_dict()["state"].keys()
    exp_avg = first.optimizer.state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(second.optimizer.state_dict()["state"][0]["exp_avg"], exp_avg)
    order = []
    second.sampler.set_epoch = lambda epoch, position=0, _set=second.sampler.set_epoch: (
        order.append((epoch, position)),
        _set(epoch, position),
    )
    assert second()["steps"] == 8 and int(second.byol.ema_step) == 8
    assert order[0] == (1, 1)  # step 4 of 3 batches per epoch: epoch 1, one batch in
    assert "checkpoint.2.pt" in {p.name for p in (tmp_path / "second").iterdir()}
    assert "checkpoint.0.pt" not in {p.name for p in (tmp_path / "second").iterdir()}
    with pytest.raises(ValueError, match="not saved by BYOLTrainer.state_dict"):
        second.set_extra_state({"knn": []})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_train_steps": 2.5}, TypeError, "num_train_steps must be a whole number, got 2.5"),
        ({"batch_size": 4.5}, TypeError, "batch_size must be a whole number, got 4.5"),
        ({"seed": -(2**62)}, ValueError, r"seed must be between -2\*\*62 and 2\*\*62"),
        ({"checkpoint_every": None}, TypeError, "checkpoint_every must be a whole number, got None"),
        ({"num_workers": 1.5}, TypeError, "num_workers must be a whole number"),
        ({"val_every": 0}, ValueError, r"val_every \(or None: every checkpoint_every steps\) must be at least 1"),
        ({"seed": "0"}, TypeError, r"seed \(or None\) must be a whole number, got '0'"),
        ({"seed": 2**70}, ValueError, r"seed must be between -2\*\*62 and 2\*\*62"),
        ({"batch_size": 1}, ValueError, "batch_size must be at least 2, got 1"),
        ({"learning_rate": "a"}, TypeError, "learning_rate must be a number, got 'a'"),
        ({"device": "banana"}, ValueError, r"device 'banana' is not a device; pass 'cpu', 'cuda'"),
        ({"checkpoint_folder": __file__}, ValueError, r"checkpoint_folder '.*test_trainer.py' is a file, not a folder"),
    ],
)
def test_counts_that_are_not_whole_numbers_are_errors_naming_them(tmp_path, make_cnn, kwargs, error, message):
    """Before: 2.5 steps were silently cut to 2, and None, '0', 4.0 or 2**70 failed inside torch or the loader."""
    base = dict(
        dataset=MockDataset(16, 12),
        image_size=16,
        hidden_layer=-2,
        learning_rate=1e-2,
        num_train_steps=2,
        batch_size=4,
        checkpoint_folder=str(tmp_path),
    )
    with pytest.raises(error, match=message):
        BYOLTrainer(make_cnn(), **{**base, **kwargs})


def test_images_of_several_sizes_more_channels_and_path_specs(tmp_path, make_cnn, make_labelled):
    """Before: images of two sizes failed in torch's collate ('stack expects each tensor to be equal size') mid-run;
    5-channel images, which BYOL takes, were refused; a pathlib.Path folder was 'not a data spec'."""

    class TwoSizes(MockDataset):
        def __getitem__(self, index):
            image = super().__getitem__(index)
            return image[:, :-1] if index % 2 else image

    base = dict(image_size=16, hidden_layer=-2, learning_rate=1e-2, num_train_steps=1, batch_size=4)
    trainer = BYOLTrainer(make_cnn(), dataset=TwoSizes(16, 12), checkpoint_folder=str(tmp_path / "a"), **base)
    with pytest.raises(ValueError, match=r"images differ in size \(\(3, 16, 16\) and \(3, 15, 16\) in one batch\)"):
        trainer()
    data = torch.utils.data.TensorDataset(torch.rand(8, 5, 16, 16))
    trainer = BYOLTrainer(make_cnn(channels=5), dataset=data, checkpoint_folder=str(tmp_path / "b"), **base)
    assert trainer()["steps"] == 1
    folder = make_labelled(tmp_path / "images", classes=2, per_class=4)
    trainer = BYOLTrainer(make_cnn(), dataset=Path(folder), checkpoint_folder=str(tmp_path / "c"), **base)
    assert trainer()["steps"] == 1


def test_whole_floats_and_states_saved_before_the_optimiser_was_kept_still_load(tmp_path, make_cnn):
    """A review: 1e5 steps (the incumbent takes them) were refused once counts were checked, and a trainer state
    saved before state_dict held the optimiser failed a strict load ('Missing key(s): _extra_state')."""
    trainer = _trainer(make_cnn, tmp_path, 1e1)
    assert trainer.num_train_steps == 10
    old = {k: v for k, v in trainer.state_dict().items() if k != "_extra_state"}
    again = _trainer(make_cnn, tmp_path, 2)
    with pytest.warns(UserWarning, match=r"holds no optimiser state \(saved before 1\.2\.0\)"):
        again.load_state_dict(old)


def test_mock_dataset_sizes_and_indices_are_whole_numbers():
    with pytest.raises(TypeError, match="image_size must be a whole number, got 32.5"):
        MockDataset(32.5, 4)  # was 32 without a word
    with pytest.raises(TypeError, match="image_size must be a whole number, got '32'"):
        MockDataset("32", 4)
    with pytest.raises(TypeError, match="MockDataset indices are ints, got 1.0"):
        MockDataset(8, 4)[1.0]
