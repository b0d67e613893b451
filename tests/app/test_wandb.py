"""--wandb: MetricsLog's W&B sink in offline mode, read back from the run's .wandb file; resumption; rank 0 only.

The offline run's records are read with a small reader of W&B's transaction log (the
LevelDB log format: a 7-byte header, then 32 KiB blocks of records with a 7-byte header
each; the payloads are ``wandb_internal_pb2.Record`` messages). Nothing is sent anywhere:
``WANDB_MODE=offline`` and every W&B folder under the test's tmp_path.
"""

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from byol_pytorch.app import cli
from byol_pytorch.app.metrics import WANDB_ID_FILE, MetricsLog


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    (tmp_path / "wandb_home").mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "wandb_home"


def _records(path: Path, block: int = 32768):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _offline_run(folder: Path, run_id: str):
    """``(files, history rows, config)`` of the offline run ``run_id`` under ``folder`` (one or more sessions).

    W&B's service process writes the log file; on a loaded machine its last records can land
    a moment after ``finish()`` returned, so the files are read until each holds its session's
    ``exit`` record (written last, at ``finish()``), for 20 s at most.
    """
    for _ in range(40):
        files, history, config, finished = _read_offline_run(folder, run_id)
        if finished == len(files):
            break
        time.sleep(0.5)
    return files, history, config


def _read_offline_run(folder: Path, run_id: str):
    files = sorted(folder.rglob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, f"no offline run {run_id} under {folder}"
    history, config, finished = [], {}, 0
    for path in files:
        for record in _records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "exit":
                finished += 1
    return files, history, config, finished


def _options(**config):
    return {"project": "byol-test", "name": "run", "config": config}


def test_the_sink_logs_the_rows_the_config_and_the_pictures(offline, tmp_path):
    from byol_pytorch.app.plots import plot_curves

    run_dir = tmp_path / "run"
    log = MetricsLog(run_dir, wandb=_options(recipe="cifar", lr=1.0, model="cifar_resnet18"))
    log.write({"step": 1, "epoch": 0.5, "loss": 3.5, "lr": 0.1, "tau": 0.99, "img_per_s": 9.0})
    log.write({"step": 2, "epoch": 1.0, "loss": 3.0, "lr": 0.2, "tau": 0.995, "knn_acc": 0.25})
    plot_curves(str(run_dir / "metrics.jsonl"), str(run_dir / "curves.png"))
    log.close([run_dir / "curves.png", run_dir / "views.png"])  # views.png does not exist: left out
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    _, history, config = _offline_run(offline, run_id)
    rows = [h for h in history if "loss" in h]
    assert [r["_step"] for r in rows] == [1, 2] and [r["loss"] for r in rows] == [3.5, 3.0]
    assert rows[0].keys() >= {"epoch", "lr", "tau", "img_per_s"} and rows[1]["knn_acc"] == 0.25
    assert config["recipe"] == "cifar" and config["lr"] == 1.0 and config["model"] == "cifar_resnet18"
    pictures = [h for h in history if "curves/_type" in h]  # an image is flattened into the step's row
    assert len(pictures) == 1 and pictures[0]["curves/_type"] == "image-file" and pictures[0]["_step"] == 2
    assert list(offline.rglob(f"offline-run-*-{run_id}/files/media/images/curves_*.png"))
    assert not any("views/_type" in h for h in history)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # the file as without W&B


def test_a_resumed_log_continues_the_same_run_and_a_new_one_starts_another(offline, tmp_path):
    run_dir = tmp_path / "run"
    first = MetricsLog(run_dir, wandb=_options())
    first.write({"step": 1, "loss": 2.0})
    first.close()
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    # W&B names an offline run's folder by the second it started: a resumption within the same
    # second would reuse the first folder, which no real resume does.
    time.sleep(1.1)
    resumed = MetricsLog(run_dir, resume_step=1, wandb=_options())
    resumed.write({"step": 2, "loss": 1.5})
    resumed.close()
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    files, history, _ = _offline_run(offline, run_id)
    assert len(files) == 2 and [h["_step"] for h in history if "loss" in h] == [1, 2]
    MetricsLog(run_dir, wandb=_options()).close()  # a new run in the folder (no resume): a new W&B run
    assert (run_dir / WANDB_ID_FILE).read_text().strip() != run_id


def test_other_ranks_log_nothing(offline, tmp_path):
    MetricsLog(tmp_path / "run", wandb=_options(), enabled=False).close()
    assert not (tmp_path / "run").exists() and not list(offline.rglob("*.wandb"))


def test_train_with_wandb_resumes_into_the_same_run(offline, tmp_path, make_cifar10, tiny_flags):
    root = make_cifar10(tmp_path / "data", per_batch=4, test=4)
    out = tmp_path / "run"
    common = ["--out", str(out), *tiny_flags, "--log-every", "1"]
    logging = ["--wandb", "--wandb-project", "byol-test"]
    assert cli.main(["train", "--data", f"cifar10:{root}", "--max-steps", "2", *common, *logging]) == 0
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    assert cli.main(["train", "--resume", "--max-steps", "3", *common]) == 0  # the run's --wandb kept (was dropped)
    assert (out / WANDB_ID_FILE).read_text().strip() == run_id
    files, history, config = _offline_run(offline, run_id)
    assert len(files) == 2 and [h["_step"] for h in history if "loss" in h] == [1, 2, 3]
    assert config["recipe"] == "cifar" and config["model"] == "resnet10t" and config["lars_clip"] is True
    assert config["data"] == f"cifar10:{root}" and config["wandb"] is True
    assert (out / "views.png").is_file() and sum("views/_type" in h for h in history) == 2  # one per session


def test_wandb_missing_is_a_one_line_error(tmp_path, monkeypatch, make_cifar10, tiny_flags, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    root = make_cifar10(tmp_path / "data", per_batch=2, test=2)
    argv = ["train", "--data", f"cifar10:{root}", "--out", str(tmp_path / "run"), *tiny_flags, "--wandb"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == (
        "byol-pytorch: error: --wandb needs the wandb package: pip install 'byol-pytorch[wandb]'\n"
    )


def test_a_wandb_that_cannot_start_is_a_value_error_naming_the_fix(offline, tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ValueError, match="wandb login.*WANDB_MODE=offline"):
        MetricsLog(tmp_path / "run", wandb=_options())


def test_a_first_start_refused_by_wandb_leaves_no_run_folder(
    offline, tmp_path, monkeypatch, make_cifar10, tiny_flags, capsys
):
    """Before: the refusal came once the lock was held, and the new folder stayed with its .lock in it."""
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    root = make_cifar10(tmp_path / "data", per_batch=2, test=2)
    out = tmp_path / "new" / "run"
    assert cli.main(["train", "--data", f"cifar10:{root}", "--out", str(out), *tiny_flags, "--wandb"]) == 1
    err = capsys.readouterr().err
    assert err.count("byol-pytorch: error: --wandb: W&B could not start") == 1 and "wandb login" in err
    assert not (tmp_path / "new").exists()


def test_a_sink_that_fails_after_wandb_started_finishes_its_run_and_keeps_no_id(offline, tmp_path, monkeypatch):
    """Before: TensorBoard refusing after W&B had started left the W&B run open and wandb_run_id behind."""
    pytest.importorskip("tensorboard")
    import torch.utils.tensorboard
    import wandb

    def refuse(log_dir, **kwargs):
        raise PermissionError(13, "Permission denied", log_dir)

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", refuse)
    with pytest.raises(PermissionError):
        MetricsLog(tmp_path / "run", tensorboard=True, wandb=_options())
    assert wandb.run is None  # finished
    assert not (tmp_path / "run" / WANDB_ID_FILE).exists()
