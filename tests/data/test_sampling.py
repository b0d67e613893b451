"""sampling.py: the epoch order (pure in (seed, epoch), split between ranks, resumable) and the step stream."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from byol_pytorch.data.sampling import EpochSampler, step_batches


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    sampler = EpochSampler(100, 4, seed=3)
    sampler.set_epoch(5)
    first = list(sampler)
    torch.manual_seed(123)  # the global generator plays no part
    other = EpochSampler(100, 4, rank=1, world_size=2, seed=3)
    assert torch.equal(other.permutation(5), sampler.permutation(5))  # the same on every rank
    again = EpochSampler(100, 4, seed=3)
    again.set_epoch(5)
    assert list(again) == first
    assert sorted(sampler.permutation(5).tolist()) == list(range(100))
    assert not torch.equal(sampler.permutation(5), sampler.permutation(6))
    assert not torch.equal(sampler.permutation(5), EpochSampler(100, 4, seed=4).permutation(5))
    assert len(first) == 100 and len(sampler) == 100  # 25 whole batches


def test_ranks_partition_the_epoch_without_overlap():
    world, batch = 3, 4
    samplers = [EpochSampler(50, batch, rank=r, world_size=world, seed=7) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    shares = [list(s) for s in samplers]
    used = world * (50 // world // batch) * batch  # 48: whole batches on every rank
    assert [len(share) for share in shares] == [used // world] * world == [len(s) for s in samplers]
    assert all(s.batches_per_epoch == 4 for s in samplers)
    flat = [i for share in shares for i in share]
    assert len(set(flat)) == len(flat) == used
    assert set(flat) == set(samplers[0].permutation(2)[:used].tolist())


def test_set_epoch_with_start_batch_continues_where_an_uninterrupted_pass_would_be():
    sampler = EpochSampler(40, 4, seed=1)
    sampler.set_epoch(3)
    full = list(sampler)
    for k in (0, 1, 7, 10):
        sampler.set_epoch(3, start_batch=k)
        assert list(sampler) == full[4 * k :] and len(sampler) == 4 * (10 - k)
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 10\], got 11"):
        sampler.set_epoch(3, start_batch=11)


def test_batches_per_epoch_round_down_to_the_accumulation():
    assert EpochSampler(40, 4, multiple_of=3).batches_per_epoch == 9  # 10 batches -> 3 whole steps of 3


def test_too_few_images_is_an_error_naming_what_one_step_needs():
    with pytest.raises(ValueError) as info:
        EpochSampler(7, 4, rank=0, world_size=2)
    assert str(info.value).startswith(
        "7 images are fewer than one optimizer step needs (8 = 4 images per process and step x 2 process(es) x 1 "
        "accumulation step(s))"
    )
    assert "lower the batch size (--batch-size, batch_size=) or add images" in str(info.value)
    with pytest.raises(
        ValueError, match=r"\(12 = 4 images per process and step x 1 process\(es\) x 3 accumulation step\(s\)\)"
    ):
        EpochSampler(11, 4, multiple_of=3)


def _index_loader(size, batch, seed=0):
    """A loader of the sample indices themselves (as float tensors), drawing from its sampler."""
    sampler = EpochSampler(size, batch, seed=seed, multiple_of=2)
    return DataLoader(torch.arange(size).float(), batch_size=batch, sampler=sampler), sampler


def test_step_batches_positions_epochs_and_accumulation_groups():
    loader, sampler = _index_loader(24, 4)  # 6 batches per epoch, 3 steps of 2 micro-batches
    steps = list(itertools.islice(step_batches(loader, sampler, 0, 0, 2), 7))
    assert [(s.epoch, s.position) for s in steps] == [(0, 2), (0, 4), (0, 6), (1, 2), (1, 4), (1, 6), (2, 2)]
    assert all(len(s.images) == 2 and s.batches_per_epoch == 6 and s.skipped == 0 for s in steps)
    for epoch in (0, 1):
        seen = torch.cat([x for s in steps[3 * epoch : 3 * epoch + 3] for x in s.images]).long()
        assert torch.equal(seen, sampler.permutation(epoch))  # the epoch's order, every image once

    # Resuming at (epoch 1, position 2) gives the uninterrupted stream from its fifth step on.
    resumed = list(itertools.islice(step_batches(loader, sampler, 1, 2, 2), 3))
    for a, b in zip(resumed, steps[4:]):
        assert (a.epoch, a.position) == (b.epoch, b.position)
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))


def test_step_batches_sum_the_skipped_files_of_their_micro_batches():
    sampler = EpochSampler(16, 2, multiple_of=2)

    class Loader:  # yields (images, skipped) like collate_images: batch i passed over i files
        def __iter__(self):
            order = list(sampler)
            for i in range(len(order) // 2):
                yield torch.tensor(order[2 * i : 2 * i + 2]), i

    steps = list(itertools.islice(step_batches(Loader(), sampler, 0, 0, 2), 5))
    # Epoch 0: batches (0, 1), (2, 3), (4, 5), (6, 7); epoch 1 starts again from batch 0.
    assert [s.skipped for s in steps] == [0 + 1, 2 + 3, 4 + 5, 6 + 7, 0 + 1]
    assert [s.epoch for s in steps] == [0, 0, 0, 0, 1]
