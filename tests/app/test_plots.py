"""Tests of byol_pytorch.app.plots: valid images of the documented size that show something."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from byol_pytorch.app.plots import plot_curves, plot_views  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def run_records(steps=120, knn=True):
    records = []
    for step in range(0, steps * 10, 10):
        record = {
            "step": step,
            "loss": 2.0 * math.exp(-step / 300) + 0.05,
            "lr": 0.1 * min(1.0, step / 100),
            "tau": 0.996 + 0.004 * step / (steps * 10),
        }
        if knn and step % 200 == 0:
            record["knn_acc"] = 0.3 + 0.4 * step / (steps * 10)
        records.append(record)
    return records


def pixels(path):
    with Image.open(path) as image:
        image.load()
        return image.size, np.asarray(image.convert("RGB"), dtype=np.float64)


def assert_not_blank(array):
    assert array.std() > 20
    colours = np.unique(array.reshape(-1, 3).astype(np.uint8), axis=0)
    assert len(colours) > 20


def ink(array):
    """Fraction of pixels that are not near-white."""
    return float((array.min(axis=2) < 200).mean())


# --------------------------------------------------------------------------- curves


def test_plot_curves_from_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps(record) for record in run_records()]
    lines.insert(3, "")  # blank lines are fine
    metrics.write_text("\n".join(lines) + '\n{"step": 1200, "lo', encoding="utf-8")  # unfinished
    out = plot_curves(metrics, tmp_path / "sub" / "curves.png", title="run 1")
    assert out == tmp_path / "sub" / "curves.png"
    size, array = pixels(out)
    assert size == (1000, 700)
    assert_not_blank(array)


def test_plot_curves_without_knn_says_so(tmp_path):
    _, with_knn = pixels(plot_curves(run_records(), tmp_path / "a.png"))
    _, without = pixels(plot_curves(run_records(knn=False), tmp_path / "b.png"))
    assert_not_blank(without)
    top_right = (slice(40, 330), slice(560, 990))  # the kNN panel's plotting area
    assert ink(without[top_right]) < ink(with_knn[top_right])
    # only a loss: the other three panels are empty but the figure keeps its size
    size, _ = pixels(plot_curves([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], tmp_path / "c.png"))
    assert size == (1000, 700)


def test_plot_curves_draws_the_projection_std_right_of_the_loss(tmp_path):
    records = run_records()
    _, without = pixels(plot_curves(records, tmp_path / "a.png"))
    for step, record in enumerate(records):
        record["proj_std"] = 0.06 * math.exp(-step / 40) + 1e-4
    _, with_std = pixels(plot_curves(records, tmp_path / "b.png"))
    red = (with_std[..., 0] > 180) & (with_std[..., 1] < 90) & (with_std[..., 2] < 90)
    assert red[:350, :500].sum() > 200  # a red dashed line and axis in the loss panel
    assert not ((without[..., 0] > 180) & (without[..., 1] < 90) & (without[..., 2] < 90)).any()


def test_plot_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        plot_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        plot_curves(bad, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no metrics record has a 'step'"):
        plot_curves([{"loss": 1.0}], tmp_path / "x.png")
    with pytest.raises(TypeError, match="record 1 is a list"):
        plot_curves([{"step": 1}, [2, 0.5]], tmp_path / "x.png")


# --------------------------------------------------------------------------- views


def test_plot_views_rgb_size_and_unnormalisation(tmp_path):
    g = torch.Generator().manual_seed(0)
    originals = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8, generator=g)
    grey = torch.full((5, 3, 32, 32), 0.5)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    view1 = (grey - mean) / std  # normalised mid-grey
    view2 = (torch.rand(5, 3, 32, 32, generator=g) - mean) / std
    out = plot_views(originals, view1, view2, tmp_path / "views.png", mean=MEAN, std=STD, max_images=3)
    size, array = pixels(out)
    assert size == (600, 600)  # 3 columns x 200 px, 3 rows x 200 px
    assert_not_blank(array)
    # the centre of row 1's "view 1" cell shows mid-grey again, not the normalised values
    np.testing.assert_allclose(array[300, 300], [128, 128, 128], atol=3)


def test_plot_views_grayscale_and_float_originals(tmp_path):
    g = torch.Generator().manual_seed(1)
    originals = torch.rand(2, 1, 28, 28, generator=g)
    views = (torch.rand(2, 1, 24, 24, generator=g) - 0.5) / 0.25
    size, array = pixels(plot_views(originals, views, views.flip(-1), tmp_path / "g.png", mean=0.5, std=0.25))
    assert size == (600, 400)
    assert_not_blank(array)
    # one (C, H, W) image is one row
    size, _ = pixels(plot_views(originals[0], views[0], views[1], tmp_path / "one.png"))
    assert size == (600, 200)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"view2": torch.rand(3, 3, 8, 8)}, ValueError, r"\[4, 4, 3\] images"),
        ({"originals": torch.rand(4, 2, 8, 8)}, ValueError, "1 or 3 channels"),
        ({"view1": torch.rand(8, 8)}, ValueError, r"\(B, C, H, W\)"),
        ({"view1": np.zeros((4, 3, 8, 8))}, TypeError, "must be a tensor"),
        ({"mean": (0.5, 0.5)}, ValueError, "mean has 2 values"),
        ({"max_images": 0}, ValueError, "max_images"),
    ],
)
def test_plot_views_errors(tmp_path, kwargs, error, match):
    args = {
        "originals": torch.rand(4, 3, 8, 8),
        "view1": torch.rand(4, 3, 8, 8),
        "view2": torch.rand(4, 3, 8, 8),
        "out_path": tmp_path / "v.png",
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        plot_views(**args)


# --------------------------------------------------------------------------- matplotlib


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    hint = (
        r"matplotlib is needed for plots: pip install matplotlib "
        r"\(or pip install 'byol-pytorch\[plots\]'\)"
    )
    with pytest.raises(ImportError, match=hint):
        plot_curves(run_records(), tmp_path / "c.png")
    with pytest.raises(ImportError, match=hint):
        plot_views(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), tmp_path / "v.png")
    assert not (tmp_path / "c.png").exists()


def test_plots_leave_pyplot_and_the_backend_alone(tmp_path):
    # a fresh interpreter: pytest or other tests may have imported pyplot already
    code = (
        "import sys, matplotlib\n"
        "from byol_pytorch.app.plots import plot_curves\n"
        "backend = lambda: dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "before = backend()\n"
        f"plot_curves([{{'step': 1, 'loss': 1.0}}], {str(tmp_path / 'c.png')!r})\n"
        "print('matplotlib.pyplot' in sys.modules, backend() is before)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]
