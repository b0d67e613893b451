"""``gs://`` shards from a Google Cloud Storage emulator (gcp-storage-emulator) started here on localhost."""

import socket
from pathlib import Path

import pytest

from byol_pytorch.app import cli
from byol_pytorch.training.checkpoint import load_checkpoint

pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")


@pytest.fixture
def gcs(tmp_path, make_shards, monkeypatch):
    """The emulator with bucket ``shards`` holding ``train-{0000..0003}.tar`` (4 x 6 samples, 2 broken)."""
    import fsspec

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="shards")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("BYOL_PYTORCH_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("gs", token="anon", skip_instance_cache=True)
    for path in sorted(Path(make_shards(tmp_path / "local")).parent.glob("*.tar")):
        fs.put_file(str(path), f"shards/{path.name}")
    fsspec.filesystem("gs").clear_instance_cache()
    yield "gs://shards/train-{0000..0003}.tar"
    fsspec.filesystem("gs").clear_instance_cache()
    server.stop()


def test_train_from_gcs(gcs, tmp_path, tiny_flags, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", gcs, "--out", str(out), *tiny_flags, "--max-steps", "3", "--bn-stats", "trained"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 3 and checkpoint["dataset_size"] == 24 and checkpoint["args"]["data"] == gcs


def test_gcs_missing_object_and_bucket_are_one_line(gcs, tmp_path, tiny_flags, capsys):
    flags = ["--out", str(tmp_path / "run"), *tiny_flags, "--max-steps", "2"]
    for spec, where in (
        ("gs://shards/missing-{0000..0003}.tar", "gs://shards/missing-0000.tar"),
        ("gs://no-such-bucket/train-{0000..0003}.tar", "gs://no-such-bucket/train-0000.tar"),
    ):
        assert cli.main(["train", "--data", spec, *flags]) == 1
        err = capsys.readouterr().err
        lines = [text for text in err.splitlines() if text.strip() and not text.startswith("byol: ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"byol-pytorch: error: --data: {where}: no such object or bucket"), err
