"""Remote tar shards read from real servers started here: an HTTP server (with range requests) in a thread."""

import base64
import functools
import http.server
import io
import json
import os
import shutil
import signal
import tarfile
import threading
import warnings

import numpy as np
import pytest
import torch

from byol_pytorch import BYOL
from byol_pytorch.app import cli
from byol_pytorch.data import remote_shards
from byol_pytorch.data.remote import ReadPolicy, RemoteReadError, ShardReadWarning, is_remote, redact
from byol_pytorch.data.remote_shards import RemoteShardDataset, RemoteShardSamples, index_document
from byol_pytorch.data.sources import data_kind
from byol_pytorch.training.checkpoint import load_checkpoint

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` plus ``Range: bytes=a-b`` (fsspec reads by range requests).

    ``server.requests`` logs every path asked for; ``server.fail`` maps a file name to how many of
    its next requests answer 503 (a negative count: all of them); ``server.cut`` to how many of its
    next range requests past byte 0 send half their bytes and close the connection; ``server.password``
    (an ``Authorization`` header value) answers 401 to requests without it.
    """

    def log_message(self, *args):
        pass

    def send_head(self):
        name = self.path.rsplit("/", 1)[-1]
        self.server.requests.append((self.command, name))
        if self.server.password and self.headers.get("Authorization") != self.server.password:
            self.send_error(401)
            return None
        left = self.server.fail.get(name, 0)
        if left:
            self.server.fail[name] = left - 1 if left > 0 else left
            self.send_error(503)
            return None
        path = self.translate_path(self.path)
        ranged = self.headers.get("Range")
        if not ranged or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, _, last = ranged.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
        with open(path, "rb") as file:
            file.seek(start)
            body = file.read(max(0, end - start + 1))
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if start > 0 and self.server.cut.get(name, 0) > 0:  # the transfer breaks off half-way
            self.server.cut[name] -= 1
            self.close_connection = True
            return io.BytesIO(body[: len(body) // 2])
        return io.BytesIO(body)


@pytest.fixture(autouse=True)
def _count_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BYOL_PYTORCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def serve(tmp_path):
    """``serve(folder, port=0) -> (base URL, server)``: a threaded HTTP server on localhost, stopped afterwards.

    ``port``: the port of a server the test stopped (``stop``), to start it again where it was.
    """
    servers = []

    def start(folder, port=0):
        handler = functools.partial(RangeHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        server.requests, server.fail, server.cut, server.password = [], {}, {}, None
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        stop(server)


def stop(server):
    """Stop a ``serve`` server: no new connection is accepted on its port (refused) until started again."""
    if not getattr(server, "stopped", False):
        server.stopped = True
        server.shutdown()
        server.server_close()


def learner_weights(out):
    return load_checkpoint(out / "last.pt")["learner"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_remote_specs_are_shards():
    assert is_remote("https://h/a-{0..3}.tar") and is_remote("s3://b/a.tar") and is_remote("pipe:cat a.tar")
    assert data_kind("https://h/a-{0..3}.tar") == "shards" and data_kind("pipe:cat x.tar") == "shards"
    assert redact("s3://k:s@b/x.tar?token=abc") == "s3://***@b/x.tar?token=***"
    for password in ("p@ss", "s3cr?t", "pa#ss"):  # the whole password, whatever it holds
        assert redact(f"https://alice:{password}@host/a.tar") == "https://***@host/a.tar"
    assert redact("s3://bucket/key@v2.tar") == "s3://bucket/key@v2.tar"  # an @ in the path is no password
    assert redact("https://host?email=me@x.org") == "https://host?email=me@x.org"  # nor one in a query
    assert redact("https://ghp_token@github.com/a.tar") == "https://***@github.com/a.tar"  # a token alone is
    from byol_pytorch.data.remote_shards import expand_remote

    pytest.importorskip("webdataset")
    assert len(expand_remote("https://h/get?path=/d/train-{0..1}.tar")) == 2  # the tar named in the query
    assert len(expand_remote("https://h/train-{0..1}.tar?X-Amz-Signature=s")) == 2  # a pre-signed URL
    with pytest.raises(ValueError, match="ending in .tar, before or after a query"):
        expand_remote("https://h/train-0.zip")


def test_train_from_http_shards_redacts_credentials(tmp_path, make_shards, tiny_flags, serve, capsys):
    pattern = make_shards(tmp_path / "shards")  # 4 x 6 samples, one undecodable, one without an image
    base, server = serve(tmp_path / "shards")
    # A password holding an @, and a pre-signed URL's query (its values are secrets too).
    query = "?token=t0ken&X-Amz-Signature=s1gnature"
    url = base.replace("http://", "http://reader:s3@cret@") + "/" + pattern.rsplit("/", 1)[-1] + query
    secrets = ("s3@cret", "cret@", "t0ken", "s1gnature")
    out = tmp_path / "run"
    argv = ["train", "--data", url, "--out", str(out), *tiny_flags, "--max-steps", "4", "--log-every", "1"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 4 and checkpoint["dataset_size"] == 24
    assert checkpoint["args"]["data"] == redact(url) and "http://***@127.0.0.1" in checkpoint["args"]["data"]
    saved = captured.out + captured.err + (out / "metrics.jsonl").read_text() + (out / ".lock").read_text()
    saved += json.dumps(checkpoint["args"])
    assert not [secret for secret in secrets if secret in saved]
    assert any(name.endswith(".tar" + query) for _, name in server.requests)
    embed = ["embed", "--data", url, "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "emb")]
    assert cli.main(embed) == 0, capsys.readouterr().err
    ids = (tmp_path / "emb" / "ids.txt").read_text().split()
    assert len(ids) == 22 and ids[0] == "train-0000.tar:s00_000"  # the 2 broken samples left out
    saved = "".join(capsys.readouterr()) + (tmp_path / "emb" / "embed.json").read_text()
    assert not [secret for secret in secrets if secret in saved]


def test_index_means_no_read_at_start_and_same_batches(tmp_path, make_shards, serve):
    pattern = make_shards(tmp_path / "shards")
    base, server = serve(tmp_path / "shards")
    url = f"{base}/{pattern.rsplit('/', 1)[-1]}"
    names = [f"train-{k:04d}.tar" for k in range(4)]
    (tmp_path / "index.json").write_text(json.dumps(index_document(names, [6] * 4)))
    indexed = RemoteShardDataset(url, 32, 4, shuffle_buffer=3, index=str(tmp_path / "index.json"))
    assert server.requests == [] and indexed.counts == [6] * 4 and indexed.batches_per_epoch == 6
    batches = list(indexed.reader_batches(0, 0))
    assert len(batches) == 6 and sum(skipped for _, skipped in batches) == 2
    counted = RemoteShardDataset(url, 32, 4, shuffle_buffer=3)  # counted once (reads every shard), cached
    assert counted.counts == [6] * 4 and any(p.suffix == ".json" for p in (tmp_path / "cache").rglob("*"))
    for (a, _), (b, _) in zip(batches, counted.reader_batches(0, 0)):
        assert torch.equal(a, b)
    resumed = list(indexed.reader_batches(0, 0, start=4))  # exact resume: the same last two batches
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches[4:], resumed))
    items = list(RemoteShardSamples(url, 32, labelled=True))
    assert len(items) == 24 and sum(not ok for *_, ok in items) == 2 and items[0][1] == 1


def test_an_index_fits_shard_urls_with_a_query(tmp_path, make_shards, serve):
    """Before: the name fallback kept the query ('train-0000.tar?X-Amz-...'), and the index listed 0 of 4 shards."""
    pattern = make_shards(tmp_path / "shards")
    base, server = serve(tmp_path / "shards")
    url = f"{base}/{pattern.rsplit('/', 1)[-1]}?X-Amz-Signature=abc123"  # a pre-signed URL's query
    names = [f"train-{k:04d}.tar" for k in range(4)]
    (tmp_path / "names.json").write_text(json.dumps(index_document(names, [6] * 4)))
    served = [f"{base}/{name}?X-Amz-Signature=old" for name in names]  # written for yesterday's signature
    (tmp_path / "urls.json").write_text(json.dumps(index_document(served, [6] * 4)))
    for index in ("names.json", "urls.json"):
        indexed = RemoteShardDataset(url, 32, 4, shuffle_buffer=3, index=str(tmp_path / index))
        assert server.requests == [] and indexed.counts == [6] * 4
    batches = list(indexed.reader_batches(0, 0))
    assert len(batches) == 6 and sum(skipped for _, skipped in batches) == 2  # the shards themselves are read


def test_counts_are_kept_in_the_run_folder_and_a_resume_counts_nothing(
    tmp_path, make_shards, tiny_flags, serve, monkeypatch
):
    pattern = make_shards(tmp_path / "shards")
    base, _ = serve(tmp_path / "shards")
    url = base.replace("http://", "http://reader:s3cret@") + "/" + pattern.rsplit("/", 1)[-1]
    out = tmp_path / "run"
    assert cli.main(["train", "--data", url, "--out", str(out), *tiny_flags, "--max-steps", "2"]) == 0
    saved = json.loads((out / "shard_counts.json").read_text())
    assert [e["nsamples"] for e in saved["shardlist"]] == [6] * 4 and "s3cret" not in json.dumps(saved)
    shutil.rmtree(tmp_path / "cache")  # the user cache is gone: the run folder's copy is what a resume reads

    def count_again(*args, **kwargs):
        raise AssertionError("a resumed run counted the shards again")

    monkeypatch.setattr(remote_shards, "count_shards", count_again)
    assert cli.main(["train", "--data", url, "--out", str(out), "--resume", "--max-steps", "4"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 4
    elsewhere = tmp_path / "other"  # a new run folder with the cache gone counts (and fails here)
    with pytest.raises(AssertionError, match="counted the shards again"):
        cli.main(["train", "--data", url, "--out", str(elsewhere), *tiny_flags, "--max-steps", "2", "--debug"])
    assert not (elsewhere / "shard_counts.json").exists()


def test_the_read_policy_comes_from_the_environment_and_gs_tries_fewer_times(monkeypatch):
    """A remote probe: a server that never answered held a run silent for 19 min a shard (8 retries of 2 x 60 s),
    with nothing to shorten it; gs:// multiplied our 8 tries by gcsfs's own 6."""
    from byol_pytorch.data.remote import RETRIES_ENV, TIMEOUT_ENV, for_scheme

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(RETRIES_ENV, raising=False)
    assert (ReadPolicy().timeout, ReadPolicy().retries) == (30.0, 8)
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    monkeypatch.setenv(RETRIES_ENV, "1")
    assert (ReadPolicy().timeout, ReadPolicy().retries) == (2.5, 1)
    assert ReadPolicy(retries=5).retries == 5  # an explicit value wins
    bad = [(TIMEOUT_ENV, "soon", "0.1"), (TIMEOUT_ENV, "nan", "0.1"), (TIMEOUT_ENV, "0", "0.1")]
    bad += [(RETRIES_ENV, "-1", "0"), (RETRIES_ENV, "1.5", "0")]
    for name, value, least in bad:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=rf"{name}='{value}': give a .*number >= {least}"):
            ReadPolicy()
        monkeypatch.delenv(name)
    monkeypatch.setenv(RETRIES_ENV, "0")
    assert ReadPolicy().retries == 0
    assert for_scheme(ReadPolicy(retries=8), "gs://b/a.tar").retries == 2
    assert for_scheme(ReadPolicy(retries=1), "gs://b/a.tar").retries == 1
    assert for_scheme(ReadPolicy(retries=8), "s3://b/a.tar").retries == 8


def test_gs_and_http_time_out_a_stall_not_a_slow_transfer():
    """A review: gs:// was given the timeout as a float, which aiohttp takes as the total of a request: an 8 MB
    block on a link below about 280 kB/s failed every read, where http and s3 time out a stall only."""
    import aiohttp

    from byol_pytorch.data.remote import _storage_options

    policy = ReadPolicy(timeout=7)
    for scheme, options in (
        ("gs", _storage_options("gs", policy)["requests_timeout"]),
        ("http", _storage_options("http", policy)["client_kwargs"]["timeout"]),
    ):
        assert isinstance(options, aiohttp.ClientTimeout), scheme
        assert (options.total, options.sock_connect, options.sock_read) == (None, 7, 7)


def test_the_first_retry_of_a_process_is_a_warning_naming_the_settings(tmp_path, make_shards, serve, monkeypatch):
    """A remote probe: retries were silent (minutes with no output)."""
    from byol_pytorch.data import remote
    from byol_pytorch.data.remote import RemoteRetryWarning, read_shard

    pattern = make_shards(tmp_path / "shards", broken=False)
    base, server = serve(tmp_path / "shards")
    url = f"{base}/{pattern.rsplit('/', 1)[-1].replace('{0000..0003}', '0001')}"
    monkeypatch.setattr(remote, "_retry_warned", False)
    server.fail.update({"train-0001.tar": 2})  # heals at the third try
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(read_shard(url, 6, lambda *_: True, ReadPolicy(retries=3, backoff=0.01, timeout=5)))
        server.fail.update({"train-0001.tar": 1})
        list(read_shard(url, 6, lambda *_: True, ReadPolicy(retries=3, backoff=0.01, timeout=5)))
    assert len(samples) == 6
    retries = [str(w.message) for w in caught if issubclass(w.category, RemoteRetryWarning)]
    assert len(retries) == 1  # once a process, however many shards retry
    assert "train-0001.tar: HTTP status 503; retrying up to 3 times" in retries[0]
    assert "BYOL_PYTORCH_REMOTE_RETRIES and BYOL_PYTORCH_REMOTE_TIMEOUT, now 5 s" in retries[0]


def test_flaky_shard_is_retried_and_a_dead_one_skipped(tmp_path, make_shards, serve):
    pattern = make_shards(tmp_path / "shards", broken=False)
    base, server = serve(tmp_path / "shards")
    url = f"{base}/{pattern.rsplit('/', 1)[-1]}"
    policy = ReadPolicy(retries=2, backoff=0.01, timeout=5)
    data = RemoteShardDataset(url, 32, 4, shuffle_buffer=0, policy=policy)
    server.fail.update({"train-0001.tar": 2, "train-0002.tar": -1})  # 1 heals within the retries, 2 never
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(data.reader_batches(0, 0))
    assert len(batches) == 6 and sum(skipped for _, skipped in batches) == 6  # shard 2's samples skipped
    messages = [str(w.message) for w in caught if issubclass(w.category, ShardReadWarning)]
    assert len(messages) == 1 and "train-0002.tar" in messages[0] and "6 remaining samples are skipped" in messages[0]
    server.fail.update(dict.fromkeys(("train-0000.tar", "train-0001.tar", "train-0003.tar"), -1))
    again = r"could not be read .*run it again \(train: --resume, from its last"
    with pytest.raises(RemoteReadError, match=again), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(data.reader_batches(0, 0))
    split = RemoteShardDataset(url, 32, 4, workers=2, policy=policy, counts=data.counts)  # 2 shards per reader
    with pytest.raises(RemoteReadError, match="none of the 2 shards this loader worker opened"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            list(split.reader_batches(0, 1))
    with pytest.raises(RemoteReadError, match="cannot count the samples of the shards: .*train-0000.tar: HTTP status"):
        RemoteShardDataset(f"{base}/train-{{0000..0001}}.tar", 32, 4, policy=policy)  # not cached: counted


def test_http_errors_are_one_line(tmp_path, make_shards, tiny_flags, serve, monkeypatch, capsys):
    make_shards(tmp_path / "shards", broken=False)
    base, server = serve(tmp_path / "shards")
    out = ["--out", str(tmp_path / "run"), *tiny_flags, "--max-steps", "2"]
    code = cli.main(["train", "--data", f"{base}/missing-{{0000..0003}}.tar", *out])
    line = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(line) == 1 and line[0].startswith("byol-pytorch: error: --data: "), line
    assert "missing-0000.tar: no such object or bucket" in line[0]
    server.password = "Basic " + base64.b64encode(b"reader:right").decode()
    code = cli.main(["train", "--data", base.replace("//", "//reader:wrong@") + "/train-{0000..0003}.tar", *out])
    line = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(line) == 1 and "train-0000.tar: access denied" in line[0] and "wrong" not in line[0], line
    server.password = None
    monkeypatch.setattr(remote_shards, "ReadPolicy", functools.partial(ReadPolicy, retries=1, backoff=0.01))
    (tmp_path / "index.json").write_text(json.dumps(index_document([f"train-{k:04d}.tar" for k in range(4)], [6] * 4)))
    flags = ["--shard-index", str(tmp_path / "index.json"), "--bn-stats", "trained", *out]
    server.fail["train-0003.tar"] = -1  # one dead shard: a warning line, the run goes on
    assert cli.main(["train", "--data", f"{base}/train-{{0000..0003}}.tar", *flags, "--max-steps", "6"]) == 0
    warned = [text for text in capsys.readouterr().err.splitlines() if "train-0003.tar" in text]
    assert warned == [
        f"byol-pytorch: warning: {base}/train-0003.tar: HTTP status 503 (after 1 retries); its 6 remaining samples "
        "are skipped (counted in skipped_files)"
    ]
    server.fail.update({f"train-{k:04d}.tar": -1 for k in range(4)})
    flags[flags.index("--out") + 1] = str(tmp_path / "run2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["train", "--data", f"{base}/train-{{0000..0003}}.tar", *flags])
    err = capsys.readouterr().err
    line = [text for text in err.splitlines() if text.strip() and not text.startswith("byol: ")]  # no progress bar
    assert code == 1 and len(line) == 1 and "Traceback" not in err, err
    assert line[0].startswith("byol-pytorch: error: --data: ") and "could not be read" in line[0]


def test_embed_takes_a_shard_index_and_names_counts_that_no_longer_fit(
    tmp_path, make_shards, tiny_flags, serve, capsys
):
    """Before: embed had no --shard-index (every shard read once more to count it), a bad index or a count it
    could not make was a traceback, and shards rewritten with more samples than the cached count ended in
    'embeddings.npy holds at most N rows' (a traceback); with fewer, the error blamed a shard failure only."""
    make_shards(tmp_path / "shards", broken=False)
    base, server = serve(tmp_path / "shards")
    url = f"{base}/train-{{0000..0003}}.tar"
    checkpoint = tmp_path / "run" / "last.pt"
    train = ["train", "--data", f"{base}/train-0000.tar", "--out", str(checkpoint.parent), *tiny_flags]
    assert cli.main([*train, "--max-steps", "1", "--bn-stats", "trained"]) == 0
    names = [f"train-{k:04d}.tar" for k in range(4)]
    (tmp_path / "index.json").write_text(json.dumps(index_document(names, [6] * 4)))
    embed = ["embed", "--checkpoint", str(checkpoint), "--batch-size", "5", "--bn-stats", "trained"]

    def run(out, *flags, data=url):
        server.requests.clear()
        capsys.readouterr()
        code = cli.main([*embed, "--data", data, "--out", str(tmp_path / out), *flags])
        return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("byol-pytorch")]

    assert run("indexed", "--shard-index", str(tmp_path / "index.json"))[0] == 0
    assert server.requests.count(("GET", "train-0003.tar")) == 1  # read to embed it, not to count it
    assert run("counted")[0] == 0
    assert server.requests.count(("GET", "train-0003.tar")) == 2  # counted (and cached), then embedded
    indexed, counted = (np.load(tmp_path / out / "embeddings.npy") for out in ("indexed", "counted"))
    assert indexed.shape == (24, indexed.shape[1]) and np.array_equal(indexed, counted)
    for flags, message in [
        (["--shard-index", str(tmp_path / "none.json")], f"--shard-index {tmp_path / 'none.json'}: cannot be read"),
        (["--shard-index", f"{base}/none.json"], f"--shard-index {base}/none.json: cannot be read (HTTP status 404)"),
    ]:
        code, lines = run("bad", *flags)
        assert code == 1 and len(lines) == 1 and lines[0].startswith(f"byol-pytorch: error: {message}"), lines
    code, lines = run("local", "--shard-index", str(tmp_path / "index.json"), data=str(tmp_path / "shards"))
    assert code == 1 and lines == [
        "byol-pytorch: error: --shard-index gives the sample counts of remote tar shards (http(s)://, s3://, gs://, "
        f"pipe:), not of {str(tmp_path / 'shards')!r}, whose samples are counted as it is opened; leave "
        "--shard-index out"
    ]
    cache = remote_shards._cache_file(remote_shards.expand_remote(url))
    assert cache.exists()
    make_shards(tmp_path / "shards", per_shard=7, broken=False)  # rewritten where they were: the cache is stale
    code, lines = run("more")
    assert code == 1 and lines == [
        f"byol-pytorch: error: --data: the shards hold more than the 24 samples the counts cached in {cache} says, "
        "so they changed since: remove that file to count the shards again, then embed again into another --out "
        f"(or remove {tmp_path / 'more'})"
    ]
    make_shards(tmp_path / "shards", per_shard=5, broken=False)
    code, lines = run("fewer", "--shard-index", str(tmp_path / "index.json"))
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("byol-pytorch: error: 4 of the 24 samples counted were not read; the 20 rows")
    assert lines[0].endswith(
        f"if none did, the shards hold fewer samples than --shard-index {tmp_path / 'index.json'} says: write it "
        "again with byol-pytorch shards index, then embed again into another --out"
    )


def test_train_refuses_a_shard_index_for_local_data_and_drops_a_saved_one_when_the_run_moves_off_remote_shards(
    tmp_path, make_shards, tiny_flags, serve, capsys
):
    """Before: train --shard-index with local shards (even an index file that does not exist) was silently
    ignored, while embed refused it; a resumed run keeps its saved index only while its data is remote shards."""
    make_shards(tmp_path / "shards", broken=False)
    local = str(tmp_path / "shards" / "train-{0000..0003}.tar")
    missing = str(tmp_path / "none.json")
    argv = ["train", "--data", local, "--shard-index", missing, "--out", str(tmp_path / "refused"), *tiny_flags]
    assert cli.main([*argv, "--max-steps", "1"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("byol-pytorch")]
    assert lines == [
        "byol-pytorch: error: --shard-index gives the sample counts of remote tar shards (http(s)://, s3://, gs://, "
        f"pipe:), not of {local!r}, whose samples are counted as it is opened; leave --shard-index out"
    ]
    assert not (tmp_path / "refused").exists()
    base, _ = serve(tmp_path / "shards")
    (tmp_path / "index.json").write_text(json.dumps(index_document([f"train-{k:04d}.tar" for k in range(4)], [6] * 4)))
    run = ["--out", str(tmp_path / "run"), *tiny_flags, "--bn-stats", "trained"]
    remote = ["--data", f"{base}/train-{{0000..0003}}.tar", "--shard-index", str(tmp_path / "index.json")]
    assert cli.main(["train", *remote, *run, "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--data", local, *run, "--max-steps", "2"]) == 0, capsys.readouterr().err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 2


def test_a_shard_cut_short_on_the_server_is_named_after_three_reads(tmp_path, make_shards, tiny_flags, serve, capsys):
    """Before: an object truncated on the server was read 9 times (8 retries, about 100 s) and blamed on the
    network; it ends at the same place on every read, so after three reads it is named truncated."""
    make_shards(tmp_path / "shards", broken=False)
    shard = tmp_path / "shards" / "train-0001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])  # cut inside a sample
    base, server = serve(tmp_path / "shards")
    argv = ["embed", "--data", f"{base}/train-{{0000..0003}}.tar", "--out", str(tmp_path / "emb")]
    checkpoint = tmp_path / "run" / "last.pt"
    train = ["train", "--data", f"{base}/train-0000.tar", "--out", str(checkpoint.parent), *tiny_flags]
    assert cli.main([*train, "--max-steps", "1", "--bn-stats", "trained"]) == 0
    capsys.readouterr()
    server.requests.clear()
    assert cli.main([*argv, "--checkpoint", str(checkpoint)]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("byol-pytorch: error: --data: ") and "truncated or corrupt; upload the shard again" in line
    assert "train-0001.tar: the object is cut short or damaged at the same place on every read" in line
    assert server.requests.count(("GET", "train-0001.tar")) == 3


def test_a_shard_cut_inside_a_header_on_the_server_is_named_not_read_as_shorter(
    tmp_path, make_shards, tiny_flags, serve, capsys
):
    """Probe: an object cut inside a header (byte 15000 of 30720) was read as a whole tar of fewer samples: with no
    count cached embed wrote 293 of 300 vectors and exit 0; with one it blamed a failed shard it never named."""
    import tarfile

    make_shards(tmp_path / "shards", broken=False)
    shard = tmp_path / "shards" / "train-0001.tar"
    third = tarfile.open(shard).getmembers()[2]
    shard.write_bytes(shard.read_bytes()[: third.offset + 100])  # two whole members, then half a header
    base, server = serve(tmp_path / "shards")
    checkpoint = tmp_path / "run" / "last.pt"
    train = ["train", "--data", f"{base}/train-0000.tar", "--out", str(checkpoint.parent), *tiny_flags]
    assert cli.main([*train, "--max-steps", "1", "--bn-stats", "trained"]) == 0
    capsys.readouterr()
    argv = ["embed", "--data", f"{base}/train-{{0000..0003}}.tar", "--out", str(tmp_path / "emb")]
    assert cli.main([*argv, "--checkpoint", str(checkpoint), "--bn-stats", "trained"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("byol-pytorch: error: --data: ") and "train-0001.tar" in line, line
    assert "without the tar's end-of-archive block" in line and "upload the shard again" in line, line
    assert not (tmp_path / "emb" / "embed.json").exists()


def test_a_remote_shard_with_a_garbage_block_is_named_not_read_as_shorter(tmp_path, make_shards):
    """Review: Python's tarfile takes a block of garbage for the archive's end; a stream whose block after the last
    member read is not zeros is damaged, named after three reads like a cut."""
    import tarfile

    from byol_pytorch.data.remote import read_shard

    make_shards(tmp_path / "shards", broken=False)
    shard = tmp_path / "shards" / "train-0001.tar"
    third = tarfile.open(shard).getmembers()[2]
    data = bytearray(shard.read_bytes())
    data[third.offset : third.offset + 512] = b"x" * 512
    shard.write_bytes(bytes(data))
    policy = ReadPolicy(retries=3, backoff=0.01)
    with pytest.raises(RemoteReadError) as error:
        list(read_shard(f"pipe:cat {shard}", None, lambda suffix, members: False, policy))
    message = str(error.value)
    assert "is neither a tar header nor the archive's end: the object is damaged" in message, message
    assert "upload the shard again" in message
    whole = tmp_path / "shards" / "train-0002.tar"
    assert len(list(read_shard(f"pipe:cat {whole}", None, lambda suffix, members: False, policy))) == 6


def test_train_from_pipe_with_workers_and_resume(tmp_path, make_shards, tiny_flags, serve, monkeypatch):
    """``pipe:CMD`` shards in two loader workers; a run stopped and resumed ends with one run's weights."""
    pattern = make_shards(tmp_path / "shards")
    base, _ = serve(tmp_path / "shards")
    spec = f"pipe:curl -s -f {base}/{pattern.rsplit('/', 1)[-1]}" if shutil.which("curl") else f"pipe:cat {pattern}"
    common = ["--data", spec, *tiny_flags[:-1], "2", "--max-steps", "4", "--shuffle-buffer", "3"]
    common += ["--bn-stats", "trained"]
    assert cli.main(["train", *common, "--out", str(tmp_path / "full")]) == 0
    original = BYOL.update_moving_average

    def update(self):  # SIGTERM right after step 2: the run saves and stops there
        original(self)
        if self._ema_count == 2:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(BYOL, "update_moving_average", update)
    assert cli.main(["train", *common, "--out", str(tmp_path / "split")]) == 128 + signal.SIGTERM
    monkeypatch.setattr(BYOL, "update_moving_average", original)
    assert cli.main(["train", *common, "--out", str(tmp_path / "split"), "--resume"]) == 0
    full, split = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert full["step"] == split["step"] == 4
    assert all(torch.equal(full["learner"][k], split["learner"][k]) for k in full["learner"])


def test_cut_transfer_resumes_where_it_broke_off(tmp_path, make_shards, serve, monkeypatch):
    """A transfer cut mid-shard is reopened at the first sample not delivered: the same batches, nothing skipped."""
    from byol_pytorch.data import remote

    pattern = make_shards(tmp_path / "shards", broken=False)
    base, server = serve(tmp_path / "shards")
    url = f"{base}/{pattern.rsplit('/', 1)[-1]}"
    monkeypatch.setattr(remote, "BLOCK", 12_000)  # several range requests per shard, 2 samples in the first
    opened, open_remote = [], remote.open_remote

    def spy(location, offset, *args):
        opened.append((location.rsplit("/", 1)[-1], offset))
        return open_remote(location, offset, *args)

    monkeypatch.setattr(remote, "open_remote", spy)
    data = RemoteShardDataset(url, 32, 4, shuffle_buffer=0, policy=ReadPolicy(retries=2, backoff=0.01, timeout=5))
    clean = list(data.reader_batches(0, 0))
    opened.clear()
    server.cut.update({"train-0001.tar": 1, "train-0002.tar": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shard is skipped
        again = list(data.reader_batches(0, 0))
    assert server.cut == {"train-0001.tar": 0, "train-0002.tar": 0}
    assert {name for name, at in opened if at > 0} == {"train-0001.tar", "train-0002.tar"}, opened  # mid-shard
    assert [s for _, s in again] == [0] * 6 and all(torch.equal(a, b) for (a, _), (b, _) in zip(clean, again))


@pytest.fixture
def outage(tmp_path, make_shards, serve, live_reads):
    """4 shards x 10 samples over HTTP, read as ``live_reads`` reads them: ``(url, server, waits)``."""
    pattern = make_shards(tmp_path / "shards", per_shard=10, broken=False)
    base, server = serve(tmp_path / "shards")
    return f"{base}/{pattern.rsplit('/', 1)[-1]}", server, live_reads


def test_server_stopped_mid_epoch_and_restarted_within_the_retries_loses_nothing(
    tmp_path, outage, serve, tiny_flags, after_update, capsys, record_fault
):
    url, server, waits = outage
    common = ["train", "--data", url, *tiny_flags, "--max-steps", "14", "--shuffle-buffer", "3"]
    common += ["--bn-stats", "trained"]
    assert cli.main([*common, "--out", str(tmp_path / "full")]) == 0
    assert waits == []
    capsys.readouterr()
    again = []

    def down_for_a_second():  # mid-epoch (10 batches an epoch): the server goes away, back 1 s later
        port = server.server_address[1]
        stop(server)
        threading.Timer(1.0, lambda: again.append(serve(tmp_path / "shards", port=port)[1])).start()

    after_update(3, down_for_a_second)
    assert cli.main([*common, "--out", str(tmp_path / "outage")]) == 0
    err = capsys.readouterr().err
    assert waits and again and again[0].requests, (waits, err)  # reads failed while it was down, went on after
    assert "warning" not in err and "skipped" not in err, err
    assert load_checkpoint(tmp_path / "outage" / "last.pt")["step"] == 14
    assert same_weights(learner_weights(tmp_path / "full"), learner_weights(tmp_path / "outage"))  # same batches
    record_fault(
        "HTTP shard server stopped mid-epoch, back within the retries",
        1,
        f"{len(waits)} reads retried; the run's weights bitwise equal to a run without the outage",
    )


def test_server_stopped_for_good_ends_in_one_line_and_keeps_the_checkpoint(
    tmp_path, outage, serve, tiny_flags, after_update, monkeypatch, capsys, record_fault
):
    url, server, _ = outage
    monkeypatch.setattr(remote_shards, "ReadPolicy", functools.partial(ReadPolicy, retries=1, backoff=0.05))
    out = tmp_path / "run"
    argv = ["train", "--data", url, *tiny_flags, "--max-steps", "14", "--checkpoint-every", "1", "--out", str(out)]
    original = BYOL.update_moving_average
    after_update(3, lambda: stop(server))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 1 and "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith("byol-pytorch: error: --data: "), err
    assert "could not be read" in errors[0] and "--resume" in errors[0]
    assert "Cannot connect to host" in errors[0] and "FileNotFoundError" not in errors[0]  # not a missing shard
    saved = load_checkpoint(out / "last.pt")  # the checkpoint of the last finished step, intact
    assert 3 <= saved["step"] < 14 and "learner" in saved
    serve(tmp_path / "shards", port=server.server_address[1])  # the storage is back: --resume goes on
    monkeypatch.setattr(BYOL, "update_moving_average", original)
    assert cli.main(["train", "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["step"] == 14
    record_fault("HTTP shard server stopped for good mid-run", 1, "one error line; last.pt of the last step kept")


SLOW_TRAIN = """
import sys, time
from byol_pytorch import BYOL
from byol_pytorch.app import cli
original = BYOL.update_moving_average
def update(self):
    original(self)
    if self._ema_count >= 3:
        time.sleep(1.0)  # slow enough to be killed at step 3 or 4; the weights do not depend on it
BYOL.update_moving_average = update
sys.exit(cli.main(sys.argv[1:]))
"""


def test_kill_9_mid_shard_then_resume_gives_the_uninterrupted_run(
    tmp_path, make_shards, serve, tiny_flags, record_fault
):
    """SIGKILL of a run reading HTTP shards with 2 loader workers, mid-shard; --resume ends with the weights
    of the run never stopped (the batches after the checkpoint are the same ones)."""
    import subprocess
    import sys
    import time

    pattern = make_shards(tmp_path / "shards", per_shard=10, broken=False)
    base, server = serve(tmp_path / "shards")
    url = f"{base}/{pattern.rsplit('/', 1)[-1]}"
    env = dict(os.environ, OMP_NUM_THREADS="1", BYOL_PYTORCH_CACHE=str(tmp_path / "cache"))
    flags = [*tiny_flags[:-1], "2", "--data", url, "--max-steps", "16", "--shuffle-buffer", "3"]
    flags += ["--checkpoint-every", "1", "--bn-stats", "trained"]

    def train(*argv, code=SLOW_TRAIN):
        return subprocess.Popen([sys.executable, "-c", code, "train", *flags, *argv], env=env, stderr=subprocess.PIPE)

    plain = "import sys; from byol_pytorch.app import cli; sys.exit(cli.main())"
    full = train("--out", str(tmp_path / "full"), code=plain)
    killed = train("--out", str(tmp_path / "killed"))
    deadline, step = time.monotonic() + 180, 0
    while step < 3 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        if (tmp_path / "killed" / "last.pt").is_file():
            step = load_checkpoint(tmp_path / "killed" / "last.pt")["step"]
    assert killed.poll() is None, killed.communicate()[1].decode()[-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    saved = load_checkpoint(tmp_path / "killed" / "last.pt")["step"]
    assert saved in (3, 4)  # mid-shard: each of the 2 readers 6 or 8 samples into its first shard of 10
    resumed = train("--out", str(tmp_path / "killed"), "--resume", code=plain)
    for process in (full, resumed):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == 16
    assert same_weights(learner_weights(tmp_path / "full"), learner_weights(tmp_path / "killed"))
    record_fault(
        "SIGKILL mid-shard of a run reading HTTP shards (2 loader workers), then --resume",
        1,
        "the weights bitwise equal to the run never stopped",
    )


def test_an_index_of_names_matches_by_the_name_each_scheme_gives(tmp_path):
    """http(s): the path's file name, unquoted, without a query; s3/gs keys whole (a key may hold '#' or '?')."""
    names = ["train#0000.tar", "a b.tar", "train-0001.tar"]
    (tmp_path / "index.json").write_text(json.dumps(index_document(names, [5, 7, 9])))
    locations = ["s3://bucket/train#0000.tar", "https://host/a%20b.tar", "https://host/train-0001.tar?sig=1#part"]
    assert remote_shards.load_index(str(tmp_path / "index.json"), locations) == [5, 7, 9]


def test_a_shard_failing_with_an_unknown_rest_gives_no_count():
    """Before: a shard failing while the clean-statistics pass read it said 'its 0 remaining samples are skipped'."""
    from byol_pytorch.data.remote import FaultBudget, ShardFailed

    budget = FaultBudget()
    with pytest.warns(UserWarning) as caught:
        budget.failure(ShardFailed("https://h/a.tar: HTTP status 503 (after 8 retries)", 2), None)
        budget.failure(ShardFailed("https://h/b.tar: HTTP status 503 (after 8 retries)", 0), 4)
    assert [str(w.message) for w in caught] == [
        "https://h/a.tar: HTTP status 503 (after 8 retries); its remaining samples are skipped",
        "https://h/b.tar: HTTP status 503 (after 8 retries); its 4 remaining samples are skipped (counted in "
        "skipped_files)",
    ]


def test_an_index_url_the_server_fails_to_answer_is_retried_then_named_unread(
    tmp_path, make_shards, serve, monkeypatch
):
    """Before: a 503 for --shard-index was reported at once as 'not a readable shard index', a format problem."""
    from byol_pytorch.data.remote_shards import load_index

    make_shards(tmp_path / "shards", broken=False)
    names = [f"train-{k:04d}.tar" for k in range(4)]
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index_document(names, [6] * 4)))
    base, server = serve(tmp_path / "shards")
    monkeypatch.setattr(remote_shards, "ReadPolicy", functools.partial(ReadPolicy, retries=2, backoff=0.01))
    locations = [f"{base}/{name}" for name in names]
    server.fail["index.json"] = 2  # two 503s, then the file
    assert load_index(f"{base}/index.json", locations) == [6] * 4
    server.fail["index.json"] = -1  # never answered
    with pytest.raises(ValueError, match=r"index.json: cannot be read \(HTTP status 503\); check its path or URL"):
        load_index(f"{base}/index.json", locations)
    assert server.requests.count(("GET", "index.json")) >= 5  # 3 (2 failed, 1 read) + 3 (all failed)
    with pytest.raises(ValueError, match="missing.json: cannot be read"):  # a 404 is not retried
        load_index(f"{base}/missing.json", locations)
    (tmp_path / "shards" / "bad.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="bad.json: not a readable shard index"):
        load_index(f"{base}/bad.json", locations)


def test_a_shard_shorter_than_its_count_hands_out_no_sample_twice_and_names_the_count(tmp_path):
    """Before: the retry of a stream read to its end reopened at offset -1: pipe: read the shard again from the
    top and handed out its first samples twice (http: a seek before the start, retried 8 times)."""
    import io
    import tarfile

    from byol_pytorch.data.remote import read_shard

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
    got = []
    with pytest.raises(RemoteReadError, match="ends after 6 of the 8 samples .* on 3 reads in a row: the count"):
        for key, _ in read_shard(f"pipe:cat {shard}", 8, lambda suffix, members: True, ReadPolicy(backoff=0.01)):
            got.append(key)
    assert got == [f"{i:04d}" for i in range(6)]  # each once


def test_a_pipe_that_prints_an_error_page_for_a_while_is_retried_not_called_truncated(tmp_path):
    """A review caught the same-cut rule ending a run on 'pipe:curl -s URL', whose 503 pages read as data."""
    import io
    import tarfile

    from byol_pytorch.data.remote import read_shard

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = 2000
            tar.addfile(info, io.BytesIO(bytes(2000)))
    half = tmp_path / "half.tar"
    half.write_bytes(shard.read_bytes()[:7000])  # cut inside the third sample
    (tmp_path / "page.html").write_text("<html>503 Service Unavailable</html>\n")
    script = tmp_path / "fetch.sh"  # the 1st call: cut short; the 2nd to 4th: an error page; then the shard
    script.write_text(
        f"n=$(cat {tmp_path}/n 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {tmp_path}/n\n"
        f"if [ $n = 1 ]; then cat {half}; elif [ $n -le 4 ]; then cat {tmp_path}/page.html; else cat {shard}; fi\n"
    )
    got = [key for key, _ in read_shard(f"pipe:sh {script}", 6, lambda s, m: True, ReadPolicy(backoff=0.01))]
    assert got == [f"{i:04d}" for i in range(6)] and (tmp_path / "n").read_text().strip() == "5"


def test_a_split_of_remote_shards_is_refused_naming_what_needs_it():
    """A remote probe: `eval --linear` on remote shards was told "a kNN split ... is not supported"."""
    from byol_pytorch.data import labelled_split

    with pytest.raises(ValueError, match=r"remote shards cannot be split .* eval \(kNN and --linear\) and train --val"):
        labelled_split("http://127.0.0.1:9/val-{0000..0001}.tar", 8)


@pytest.mark.parametrize("command", ["no-such-command-byol-probe", "./not-executable.sh"])
def test_a_pipe_command_the_shell_cannot_run_fails_at_once_not_after_retries(tmp_path, command, monkeypatch):
    """Before: 'pipe:' of a missing or non-executable command was retried as a network fault (8 tries, about
    100 s a shard) and ended 'ConnectionError: the command exited with status 127 (after 8 retries)'."""
    from byol_pytorch.data import remote
    from byol_pytorch.data.remote import ShardFailed, read_shard

    (tmp_path / "not-executable.sh").write_text("cat a.tar\n")  # no x bit: the shell exits 126
    monkeypatch.chdir(tmp_path)
    runs = []
    real = remote._PipeFile

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(remote, "_PipeFile", counted)
    with pytest.raises(RemoteReadError) as caught:
        list(read_shard(f"pipe:{command} a.tar", None, lambda suffix, members: True, ReadPolicy(backoff=0.01)))
    word = "was not found (exit status 127" if "no-such" in command else "is not executable (exit status 126"
    assert f"the command {word}" in str(caught.value) and "check the command after pipe:" in str(caught.value)
    assert len(runs) == 1
    # a command that ran and failed (a server's outage under curl -f) is still retried
    with warnings.catch_warnings(), pytest.raises(ShardFailed, match=r"status 3 \(after 2 retries"):
        warnings.simplefilter("ignore", remote.RemoteRetryWarning)
        list(read_shard("pipe:exit 3", None, lambda suffix, members: True, ReadPolicy(retries=2, backoff=0.01)))
    assert len(runs) == 4


def test_remote_samples_without_a_label_are_left_out_or_read_as_minus_one(tmp_path, serve):
    """A probe (local shards): embed left out a sample with no .cls as 'unreadable'; remote shards read the same."""
    import io

    from PIL import Image

    (tmp_path / "s").mkdir()
    with tarfile.open(tmp_path / "s" / "lab-0.tar", "w") as tar:
        for key, label in (("a", b"0"), ("b", b"1"), ("c", None)):
            buffer = io.BytesIO()
            Image.new("RGB", (12, 12), (80, 20, 5)).save(buffer, "PNG")
            for suffix, data in (("png", buffer.getvalue()), ("cls", label)):
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    base, server = serve(tmp_path / "s")
    strict = [(label, key, ok) for _, label, key, ok in RemoteShardSamples(f"{base}/lab-0.tar", 16, labelled=True)]
    assert strict == [(0, "lab-0.tar:a", True), (1, "lab-0.tar:b", True), (-1, "lab-0.tar:c", False)]
    optional = RemoteShardSamples(f"{base}/lab-0.tar", 16, labelled=True, labels_optional=True)
    assert [(label, ok) for _, label, _, ok in optional] == [(0, True), (1, True), (-1, True)]
    from byol_pytorch.data import make_loader

    before = len(server.requests)  # the review: make_loader asked len(), which reads every uncounted shard
    make_loader(RemoteShardSamples(f"{base}/lab-0.tar", 16), batch_size=2, drop_last=True)
    assert len(server.requests) == before
