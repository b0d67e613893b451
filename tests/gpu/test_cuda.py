"""The GPU suite (issue 26): what only a CUDA device can show. Skipped without one.

Run it, with the GPU rows of BENCHMARKS.md, by ``python -m benchmarks.gpu`` (under 10 minutes
on one GPU). Each test names what it checks:

* a training step makes no host sync (``torch.cuda.set_sync_debug_mode("error")``);
* an fp16 step makes exactly one (the GradScaler's own check);
* a NaN injected at step 100 raises within two updates; 200 clean steps on a slowed stream
  never raise (the deferred check never reads a copy that has not landed);
* ``torch.compile`` (Inductor, bf16) runs with no graph break and the eager loss;
* the README's snippet and ``byol-pytorch train`` at 224 px on ResNet-50, bf16, channels_last.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

REPO = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda", 0)


def _learner(**kwargs):
    import timm

    from byol_pytorch import BYOL

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).to(DEVICE)
    return BYOL(net, image_size=64, projection_size=64, projection_hidden_size=256, **kwargs)


def _step(learner, optimizer, images, scaler=None):
    with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
        loss = learner(images)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    learner.update_moving_average()
    return loss


def test_a_training_step_makes_no_host_sync():
    learner = _learner()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9)
    images = torch.randint(0, 256, (32, 3, 72, 72), dtype=torch.uint8, device=DEVICE)
    for _ in range(3):  # the target's copy, the heads' first use, the first pinned buffers
        _step(learner, optimizer, images)
    torch.cuda.synchronize()
    before = int(learner.ema_step)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the steps below raises a RuntimeError
    try:
        for _ in range(5):
            _step(learner, optimizer, images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(learner.ema_step) == before + 5  # the five steps ran to their EMA update, none synced


def test_an_fp16_step_makes_one_host_sync_the_scalers():
    from byol_pytorch.training.distributed import DistContext
    from byol_pytorch.training.engine import OptimizerStep

    learner = _learner()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    step = OptimizerStep(learner, learner, optimizer, None, "fp16", DEVICE, scaler)
    learner.finite_check = False
    images = torch.randint(0, 256, (32, 3, 72, 72), dtype=torch.uint8, device=DEVICE)
    for _ in range(3):
        step([images])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step([images])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert DistContext().device.type == "cpu"  # the context's default, untouched


def test_a_nan_at_step_100_raises_within_two_updates():
    learner = _learner()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(16, 3, 72, 72, device=DEVICE)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    raised_at = None
    for step in range(1, 110):
        try:
            _step(learner, optimizer, bad if step == 100 else images)
        except FloatingPointError:
            raised_at = step
            break
    assert raised_at is not None and 100 <= raised_at <= 102, raised_at


def test_a_slow_stream_never_raises_a_false_alarm():
    learner = _learner()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(16, 3, 72, 72, device=DEVICE)
    for _ in range(200):
        _step(learner, optimizer, images)
        torch.cuda._sleep(2_000_000)  # ~1 ms of device time after each step: copies land late
    torch.cuda.synchronize()


def test_compile_bf16_has_no_graph_break_and_the_eager_loss():
    from byol_pytorch import BYOL

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).to(DEVICE)
    learner = BYOL(net, 32, augment_fn=nn.Identity(), augment_fn2=lambda x: x.flip(-1), use_batchnorm=False)
    learner.init_target()
    images = torch.rand(8, 3, 32, 32, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = learner(images)
        explanation = torch._dynamo.explain(learner)(images)
        compiled = torch.compile(learner)(images)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


def test_the_readme_snippet_runs_on_the_gpu(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "epochs = 100\n" in snippet
    snippet = snippet.replace("epochs = 100\n", "epochs = 1\n")  # one pass over the test's loader
    monkeypatch.chdir(tmp_path)
    loader = [torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8, pin_memory=True) for _ in range(3)]
    scope = {"loader": loader}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102
    assert scope["learner"].ema_step.device.type == "cuda" and int(scope["learner"].ema_step) == 3


def test_the_cli_at_224_px_resnet50_bf16_channels_last(tmp_path):
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(256):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    out = tmp_path / "run"
    argv = ["train", "--data", str(images), "--out", str(out), "--model", "resnet50", "--image-size", "224"]
    argv += ["--batch-size", "64", "--max-steps", "12", "--precision", "bf16", "--channels-last", "--workers", "4"]
    result = subprocess.run([sys.executable, "-m", "byol_pytorch", *argv], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "last.pt").exists() and "img_per_s" in (out / "metrics.jsonl").read_text()
