"""`byol-pytorch train --data cifar10:ROOT` and `eval` on the official CIFAR-10 format, end to end."""

import json

from byol_pytorch.app import cli
from byol_pytorch.training.checkpoint import load_checkpoint

TINY_CIFAR = (
    "--model",
    "cifar_resnet18",
    "--image-size",
    "16",
    "--batch-size",
    "4",
    "--projection-size",
    "16",
    "--projection-hidden-size",
    "32",
    "--workers",
    "0",
)


def test_train_and_eval_on_cifar10_batches(tmp_path, make_cifar10, capsys):
    root = make_cifar10(tmp_path / "data", per_batch=8, test=10)
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        f"cifar10:{root}",
        "--out",
        str(out),
        *TINY_CIFAR,
        "--max-steps",
        "2",
        "--log-every",
        "1",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "cifar_resnet18 on 40 images (3 channels)" in printed and "(recipe cifar)" in printed
    checkpoint = load_checkpoint(out / "last.pt")
    args = checkpoint["args"]
    assert checkpoint["step"] == 2 and args["recipe"] == "cifar" and args["data"] == f"cifar10:{root}"
    # The recipe's values not overridden by a flag, saved with the run.
    assert (args["tau_base"], args["weight_decay"], args["lars_trust"], args["lars_clip"]) == (0.99, 1e-5, 0.02, True)
    assert (args["blur_p1"], args["blur_p2"], args["solarize_p2"], args["image_size"]) == (0.0, 0.0, 0.2, 16)
    assert args["lr"] == 1.0 * 4 / 256
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["tau"] == 0.99

    assert (
        cli.main(["eval", "--data", f"cifar10:{root / 'cifar-10-batches-py'}", "--checkpoint", str(out / "last.pt")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "40 labelled images to fit, 10 held out, 10 classes" in printed
    assert "kNN accuracy (k=20, T=0.07): " in printed and "linear probe accuracy: " in printed


def test_missing_cifar_is_a_one_line_error_naming_the_tarball(tmp_path, capsys):
    assert cli.main(["train", "--data", f"cifar100:{tmp_path}", "--out", str(tmp_path / "run"), *TINY_CIFAR]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("byol-pytorch: error: --data: no cifar100 python batches")
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in err and "CIFAR100(" in err
