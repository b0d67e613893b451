"""LARS, parameter groups and the warm-up + cosine schedule against hand-computed values."""

import math

import pytest
import torch
import torch.nn as nn

from byol_pytorch.training.optim import (
    LARS,
    build_optimizer,
    default_lr,
    param_groups,
    resync_lr,
    warmup_cosine,
    warmup_cosine_scheduler,
)


# ---------------------------------------------------------------- warmup_cosine
@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.1),  # (0 + 1) / 10
        (4, 0.5),  # (4 + 1) / 10
        (9, 1.0),  # the last warm-up step reaches the peak
        (10, 1.0),  # cosine starts at the peak: cos(0) = 1
        (55, 0.5),  # half-way through the 90 cosine steps: (1 + cos(pi / 2)) / 2
        (100, 0.0),  # past the end
        (250, 0.0),
    ],
)
def test_warmup_cosine_hand_values(step, expected):
    assert warmup_cosine(step, total=100, warmup=10, base_lr=1.0) == pytest.approx(expected, abs=1e-12)


def test_warmup_cosine_without_warmup_and_scaling():
    assert warmup_cosine(0, 4, 0, 2.0) == pytest.approx(2.0)
    assert warmup_cosine(1, 4, 0, 2.0) == pytest.approx(2.0 * (1 + math.cos(math.pi / 4)) / 2)
    assert warmup_cosine(3, 4, 0, 2.0) == pytest.approx(2.0 * (1 + math.cos(3 * math.pi / 4)) / 2)


def test_default_lr_is_paper_rule():
    assert default_lr("lars", 256) == pytest.approx(0.2)
    assert default_lr("lars", 4096) == pytest.approx(3.2)  # 0.2 x 4096 / 256 (paper)


def test_scheduler_follows_a_new_total_after_loading():
    param = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.4)
    sched = warmup_cosine_scheduler(opt, total=10, warmup=2)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([warmup_cosine(k, 10, 2, 0.4) for k in range(4)])
    state = sched.state_dict()

    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.4)
    sched2 = warmup_cosine_scheduler(opt2, total=20, warmup=2)
    sched2.load_state_dict(state)
    resync_lr(sched2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(warmup_cosine(4, 20, 2, 0.4))
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(warmup_cosine(5, 20, 2, 0.4))


# ---------------------------------------------------------------- param_groups
def test_param_groups_exclude_biases_norms_and_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.LayerNorm(2))
    frozen = nn.Linear(2, 2)
    for p in frozen.parameters():
        p.requires_grad_(False)
    model.add_module("frozen", frozen)
    decay, no_decay = param_groups(model, 0.5)
    assert decay["weight_decay"] == 0.5 and not decay["lars_exclude"]
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model[0].weight, model[3].weight])
    assert ids(no_decay["params"]) == ids(
        [model[0].bias, model[1].weight, model[1].bias, model[3].bias, model[4].weight, model[4].bias]
    )


# ---------------------------------------------------------------- LARS
def test_lars_two_steps_by_hand():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ||p|| = 5
    opt = LARS([p], lr=1.0, momentum=0.9, trust_coefficient=1e-3)
    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)  # ||g|| = 1
    opt.step()
    # trust = 1e-3 * 5 / 1 -> update [0.003, 0.004]
    torch.testing.assert_close(p.detach(), torch.tensor([2.997, 3.996], dtype=torch.float64))
    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    # ||p|| = 4.995 -> scaled grad [0.002997, 0.003996]; v = 0.9 * [0.003, 0.004] + it
    torch.testing.assert_close(p.detach(), torch.tensor([2.997 - 0.005697, 3.996 - 0.007596], dtype=torch.float64))


def test_lars_weight_decay_enters_the_trust_ratio():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=1.0, weight_decay=0.1)
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    # g = 0.1 * p = [0.3, 0.4], ||g|| = 0.5 -> trust 1e-3 * 5 / 0.5 = 0.01 -> [0.003, 0.004]
    torch.testing.assert_close(p.detach(), torch.tensor([2.997, 3.996], dtype=torch.float64))


def test_lars_excluded_group_is_plain_momentum_sgd_without_decay():
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LARS([{"params": [w], "lars_exclude": True, "weight_decay": 0.1}], lr=0.5)
    w.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    assert w.item() == pytest.approx(1.0 - 0.5 * 2.0)
    w.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    assert w.item() == pytest.approx(0.0 - 0.5 * (0.9 * 2.0 + 2.0))


def test_lars_zero_norm_parameter_uses_trust_one():
    p = nn.Parameter(torch.zeros(2))
    opt = LARS([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2,), -0.1))


def _reference_lars(params, grads, states, lr, wd, momentum=0.9, eta=1e-3, exclude=False):
    """A per-tensor loop written from the formula, to check the fused implementation."""
    for p, g, key in zip(params, grads, range(len(params))):
        d = g.clone()
        if not exclude:
            d = d + wd * p
            pn, gn = p.norm().item(), d.norm().item()
            if pn > 0 and gn > 0:
                d = d * (eta * pn / gn)
        states[key] = momentum * states.get(key, torch.zeros_like(p)) + d
        p -= lr * states[key]


def test_lars_matches_a_reference_loop_on_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    groups = param_groups(model, 1e-2)
    opt = LARS(groups, lr=0.3)
    ref_groups = [
        [reference[i] for i, p in enumerate(model.parameters()) if any(p is q for q in g["params"])] for g in groups
    ]
    states = [{}, {}]
    for _ in range(3):
        x = torch.randn(8, 5)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = {id(p): p.grad.clone() for p in model.parameters()}
        ref_grads = [[grads[id(p)] for p in g["params"]] for g in groups]
        opt.step()
        for k, g in enumerate(groups):
            _reference_lars(ref_groups[k], ref_grads[k], states[k], 0.3, g["weight_decay"], exclude=g["lars_exclude"])
        for k, g in enumerate(groups):
            for p, r in zip(g["params"], ref_groups[k]):
                torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-7)


def test_lars_rejects_negative_values():
    with pytest.raises(ValueError, match="lr"):
        LARS([nn.Parameter(torch.zeros(1))], lr=-1.0)


def test_build_optimizer_names():
    model = nn.Linear(3, 3)
    assert isinstance(build_optimizer("lars", model, 0.1, 1e-6), LARS)
    assert isinstance(build_optimizer("adamw", model, 0.1, 1e-6), torch.optim.AdamW)
    sgd = build_optimizer("sgd", model, 0.1, 1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="lars, adamw, sgd"):
        build_optimizer("adam", model, 0.1, 0.0)


def test_lars_clip_lr_caps_the_trust_ratio_at_one_over_lr():
    """solo-learn's clip_lr: the step is min(eta ||p|| / ||g||, lr) times the gradient."""
    for lr, grad, expected in ((1.0, 1e-4, 1e-4), (1.0, 10.0, 0.02 * 4 / 40 * 10), (0.0, 1e-4, 0.0)):
        p = nn.Parameter(torch.ones(4, 4))
        p.grad = torch.full((4, 4), grad)  # ||p|| = 4, ||g|| = 4 grad
        LARS([p], lr=lr, momentum=0.0, trust_coefficient=0.02, clip_lr=True).step()
        torch.testing.assert_close(p.detach(), torch.full((4, 4), 1.0 - expected))
    p = nn.Parameter(torch.ones(4, 4))
    p.grad = torch.full((4, 4), 1e-4)
    LARS([p], lr=1.0, momentum=0.0, trust_coefficient=0.02).step()  # unclipped: ratio 200 times the gradient
    torch.testing.assert_close(p.detach(), torch.full((4, 4), 1.0 - 0.02 * 1e4 * 1e-4))
