"""``s3://`` shards from moto's S3 server, started here on localhost: training, and each error as one line."""

import socket
from pathlib import Path

import pytest

from byol_pytorch.app import cli
from byol_pytorch.training.checkpoint import load_checkpoint

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Moto:
    """moto's S3 server on one localhost port, which a test can stop (connections refused) and start again.

    Buckets and objects live in moto's in-process back-end: a server started again serves them.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.server = None
        self.start()

    def start(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # free the port: the next connection is refused
            self.server = None


@pytest.fixture
def moto(tmp_path, make_shards, monkeypatch):
    """A moto S3 server with bucket ``shards`` holding ``train-{0000..0003}.tar`` (4 x 10 samples, none broken)."""
    yield from _moto(tmp_path, monkeypatch, make_shards(tmp_path / "local", per_shard=10, broken=False))


@pytest.fixture
def s3(tmp_path, make_shards, monkeypatch):
    """A moto S3 server with bucket ``shards`` holding ``train-{0000..0003}.tar`` (4 x 6 samples, 2 broken)."""
    for served in _moto(tmp_path, monkeypatch, make_shards(tmp_path / "local")):
        yield served[0]


def _moto(tmp_path, monkeypatch, pattern):
    import boto3
    import s3fs

    server = Moto()
    port = server.port
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "BYOL_PYTORCH_CACHE": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="shards")
    for path in sorted(Path(pattern).parent.glob("*.tar")):
        client.upload_file(str(path), "shards", path.name)
    yield "s3://shards/train-{0000..0003}.tar", server
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def error_line(capsys):
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip() and not text.startswith("byol: ")]  # no progress bar
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("byol-pytorch: error: --data: "), err
    return lines[0]


def test_train_from_s3(s3, tmp_path, tiny_flags, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", s3, "--out", str(out), *tiny_flags, "--max-steps", "3"]) == 0
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 3 and checkpoint["dataset_size"] == 24 and checkpoint["args"]["data"] == s3
    assert "testing" not in capsys.readouterr().err


def test_s3_errors_are_one_line(s3, tmp_path, tiny_flags, monkeypatch, capsys):
    import s3fs
    from moto import settings

    flags = ["--out", str(tmp_path / "run"), *tiny_flags, "--max-steps", "2"]
    assert cli.main(["train", "--data", "s3://no-such-bucket/train-{0000..0003}.tar", *flags]) == 1
    assert "s3://no-such-bucket/train-0000.tar: no such object or bucket" in error_line(capsys)
    assert cli.main(["train", "--data", "s3://shards/missing-{0000..0003}.tar", *flags]) == 1
    assert "s3://shards/missing-0000.tar: no such object or bucket" in error_line(capsys)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks credentials now
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    assert cli.main(["train", "--data", s3, *flags]) == 1
    line = error_line(capsys)
    assert "s3://shards/train-0000.tar: access denied" in line and "AWS_ACCESS_KEY_ID" in line
    assert "not-the-secret" not in line


def test_s3_server_stopped_mid_epoch_and_restarted_loses_nothing(
    moto, live_reads, after_update, tmp_path, tiny_flags, capsys
):
    import threading

    import torch

    spec, server = moto
    common = ["train", "--data", spec, *tiny_flags, "--max-steps", "14", "--shuffle-buffer", "3"]
    common += ["--bn-stats", "trained"]
    assert cli.main([*common, "--out", str(tmp_path / "full")]) == 0
    assert live_reads == []

    def down_for_a_second():  # after step 3 of 10 in the epoch: the server goes away, back 1 s later
        server.stop()
        threading.Timer(1.0, server.start).start()

    after_update(3, down_for_a_second)
    assert cli.main([*common, "--out", str(tmp_path / "outage")]) == 0
    err = capsys.readouterr().err
    assert live_reads and "warning" not in err and "skipped" not in err, (live_reads, err)
    full = load_checkpoint(tmp_path / "full" / "last.pt")["learner"]
    outage = load_checkpoint(tmp_path / "outage" / "last.pt")
    assert outage["step"] == 14 and all(torch.equal(full[k], outage["learner"][k]) for k in full)


def test_no_credentials_at_all_is_one_line_at_once_in_train_and_embed(s3, tmp_path, tiny_flags, monkeypatch, capsys):
    """Before: botocore's NoCredentialsError was retried 8 times as a network fault (about 100 s) and the line
    said to check the network; and embed showed a traceback for remote errors no retry heals."""
    import s3fs

    flags = ["--out", str(tmp_path / "run"), *tiny_flags, "--max-steps", "2"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    assert cli.main(["train", "--data", s3, *flags]) == 1
    line = error_line(capsys)
    assert "s3://shards/train-0000.tar: no credentials found" in line and "AWS_ACCESS_KEY_ID" in line
    assert "retries" not in line and "network" not in line
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3fs.S3FileSystem.clear_instance_cache()
    assert cli.main(["train", "--data", s3, *flags]) == 0
    checkpoint = tmp_path / "run" / "last.pt"
    capsys.readouterr()
    embed = ["embed", "--data", "s3://no-such-bucket/train-{0000..0003}.tar", "--checkpoint", str(checkpoint)]
    assert cli.main([*embed, "--out", str(tmp_path / "emb")]) == 1
    assert "s3://no-such-bucket/train-0000.tar: no such object or bucket" in error_line(capsys)
