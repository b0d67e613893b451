"""`byol-pytorch train` on tar shards and local Hugging Face datasets: end to end, broken samples, resume, errors."""

import json
import os
import signal
import sys

import pytest
import torch

from byol_pytorch import BYOL
from byol_pytorch.app import cli
from byol_pytorch.app.train import get_args_parser
from byol_pytorch.app.train import main as train_main
from byol_pytorch.training.checkpoint import load_checkpoint


def run_train(argv):
    return train_main(get_args_parser().parse_args(argv))


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stop_at(monkeypatch, at_step):
    """SIGTERM right after optimizer step ``at_step``: the run saves and stops there."""
    original = BYOL.update_moving_average

    def update(self):
        original(self)
        if self._ema_count == at_step:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(BYOL, "update_moving_average", update)


def assert_same_learner(a, b):
    full, split = load_checkpoint(a)["learner"], load_checkpoint(b)["learner"]
    assert full.keys() == split.keys()
    for name in full:
        assert torch.equal(full[name], split[name]), name


def test_shards_end_to_end_counts_broken_samples(tmp_path, make_shards, tiny_flags, capsys):
    pattern = make_shards(tmp_path / "shards")  # 4 x 6 samples, one undecodable, one without an image
    out = tmp_path / "run"
    argv = ["train", "--data", pattern, "--out", str(out), *tiny_flags, "--max-steps", "6", "--log-every", "1"]
    assert cli.main(argv) == 0  # 24 samples / batch 4: one epoch
    err = capsys.readouterr().err
    assert "2 unreadable, empty or corrupt image files were passed over so far" in err
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 6 and checkpoint["dataset_size"] == 24 and checkpoint["args"]["data"] == pattern
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["skipped_files"] == 2
    assert rows[-1]["epoch"] == 1.0 and all(0 <= r["loss"] <= 8 for r in rows)


def test_the_default_workers_fit_the_shards_an_explicit_count_is_kept(tmp_path, make_shards, tiny_flags, capsys):
    """Before: one tar file and no --workers was refused on a machine of 2 or more CPUs (the default, min(8, CPUs),
    asked for more readers than shards)."""
    pattern = make_shards(tmp_path / "shards", shards=1, per_shard=8, broken=False)
    flags = [*tiny_flags[:-2], "--max-steps", "2"]  # no --workers: the default
    assert (os.cpu_count() or 1) >= 2  # the default would be 2 or more readers of the one shard
    assert cli.main(["train", "--data", pattern, "--out", str(tmp_path / "run"), *flags]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2
    capsys.readouterr()
    argv = ["train", "--data", pattern, "--out", str(tmp_path / "asked"), *flags, "--workers", "2"]
    assert cli.main(argv) == 1
    assert "1 shards cannot be split between 1 process(es) x 2 loader worker(s)" in capsys.readouterr().err


def test_uneven_shards_get_workers_that_read_them_and_a_short_epoch_is_named(tmp_path, make_shards, tiny_flags, capsys):
    """DDP probe: 3 shards [14, 14, 12] read by the default 2 workers gave 6 steps an epoch (24 of 40 samples), with no
    word; the default now reads them whole, and an explicit --workers that cannot gets a warning."""
    pattern = make_shards(tmp_path / "s", per_shard=[14, 14, 12], broken=False)
    flags = [*tiny_flags[:-2], "--max-steps", "1"]  # batch 4; no --workers: the default
    assert cli.main(["train", "--data", pattern, "--out", str(tmp_path / "run"), *flags]) == 0
    out, err = capsys.readouterr()
    assert "an epoch reads" not in err and ("10 steps/epoch" in out or "9 steps/epoch" in out), out
    argv = ["train", "--data", pattern, "--out", str(tmp_path / "two"), *flags, "--workers", "2"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "6 steps/epoch" in out and "warning: an epoch reads 24 of the 40 samples (60%): each of the 2 readers" in err
    assert "make the shard count a multiple of 2 and each reader's share a multiple of 4 samples" in err
    assert err.count("byol-pytorch: warning:") == 1 and "; or lower --workers" in err
    # Review: a run whose default workers an earlier version chose (2 here) resumes with them, not with this
    # version's choice, which would skip the rest of the epoch.
    checkpoint = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    checkpoint["args"]["workers"] = None
    torch.save(checkpoint, tmp_path / "two" / "last.pt")
    assert cli.main(["train", "--out", str(tmp_path / "two"), "--resume", "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "since the checkpoint:" not in err and load_checkpoint(tmp_path / "two" / "last.pt")["step"] == 2


def test_a_resume_keeps_the_runs_workers_and_asks_again_for_credentials(tmp_path, make_shards, tiny_flags, capsys):
    """Before: --resume fell back to the default --workers, so a shard run started with --workers 0 skipped the
    rest of its epoch; a run whose URL held a password was resumed from the redacted URL ('access denied')."""
    from byol_pytorch.training.checkpoint import save_checkpoint

    pattern = make_shards(tmp_path / "shards", broken=False)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", pattern, "--out", str(out), *tiny_flags, "--max-steps", "3"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "5"]) == 0  # no --workers: the run's 0
    err = capsys.readouterr().err
    assert "since the checkpoint:" not in err and load_checkpoint(out / "last.pt")["batch_in_epoch"] == 5

    checkpoint = load_checkpoint(out / "last.pt")
    checkpoint["args"]["data"] = "https://***@data.example/train-{0000..0003}.tar"  # as redact() saved it
    save_checkpoint(out / "last.pt", checkpoint)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", "6"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        "byol-pytorch: error: the run's --data https://***@data.example/train-{0000..0003}.tar held credentials, "
        "which checkpoints do not keep: pass --data again, with them, to resume it"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    checkpoint["args"]["shard_index"] = "https://data.example/index.json?token=***"  # a remote probe: unnamed
    save_checkpoint(out / "last.pt", checkpoint)
    assert cli.main(["train", "--out", str(out), "--resume", "--data", pattern, "--max-steps", "6"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        "byol-pytorch: error: the run's --shard-index https://data.example/index.json?token=*** held credentials, "
        "which checkpoints do not keep: pass --shard-index again, with them, to resume it"
    )


def test_a_resume_on_other_shards_of_as_many_samples_is_told_and_moved_shards_are_not(
    tmp_path, make_shards, tiny_flags, capsys
):
    """Probe: a shard run resumed on another set of shards (as many samples) went on without a word, its saved
    position read in shards it never saw; a folder run is told ("other names")."""
    import shutil

    pattern = make_shards(tmp_path / "shards", broken=False)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", pattern, "--out", str(out), *tiny_flags, "--max-steps", "3"]) == 0
    shutil.copytree(tmp_path / "shards", tmp_path / "moved")  # the same set on another disk
    capsys.readouterr()
    moved = pattern.replace(str(tmp_path / "shards"), str(tmp_path / "moved"))
    assert cli.main(["train", "--out", str(out), "--resume", "--data", moved, "--max-steps", "4"]) == 0
    assert "since the checkpoint:" not in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    for shard in sorted((tmp_path / "shards").glob("*.tar")):  # as many samples, other shards
        shutil.copy(shard, other / shard.name.replace("train", "more"))
    again = ["train", "--out", str(out), "--resume", "--data", str(other / "more-{0000..0003}.tar"), "--max-steps", "5"]
    assert cli.main(again) == 0
    err = capsys.readouterr().err
    assert "since the checkpoint: the shards (other names or sample counts); the rest of epoch 0 is skipped" in err


def test_a_shards_name_ignores_where_it_lies_and_a_signed_urls_rotating_token():
    """Review: the digest took a URL's last part with its query, so a requeue with a fresh signed URL token was
    told "other shards" and skipped the rest of its epoch."""
    from byol_pytorch.app.train import _shard_name

    same = [
        "https://data.example/d/train-0001.tar?sv=1&sig=abc",
        "https://data.example/d/train-0001.tar?sv=1&sig=xyz",
        "s3://bucket/prefix/train-0001.tar",
        "pipe:aws s3 cp s3://bucket/train-0001.tar -",
        "pipe:curl -s -f https://data.example/train-0001.tar?token=1",
        "/mnt/disk/shards/train-0001.tar",
    ]
    assert {_shard_name(location) for location in same} == {"train-0001.tar"}
    assert _shard_name("https://data.example/d/train-0002.tar?sig=abc") == "train-0002.tar"


def test_shards_resume_is_bitwise_with_workers(tmp_path, make_shards, tiny_flags, monkeypatch, capsys):
    pattern = make_shards(tmp_path / "shards")
    common = ["--data", pattern, *tiny_flags[:-1], "2", "--max-steps", "8", "--log-every", "4", "--shuffle-buffer", "3"]
    assert run_train([*common, "--out", str(tmp_path / "full")])["exit_code"] == 0
    with monkeypatch.context() as patch:
        stop_at(patch, 3)  # mid-epoch (6 batches per epoch): each worker is inside a shard
        assert run_train([*common, "--out", str(tmp_path / "split")])["step"] == 3
    resumed = run_train(
        ["--out", str(tmp_path / "split"), "--resume", "--workers", "2", "--log-every", "4"]
    )  # buffer 3
    assert resumed["step"] == 8 and resumed["epoch"] == 1
    assert_same_learner(tmp_path / "full" / "last.pt", tmp_path / "split" / "last.pt")


def test_shards_resume_with_other_workers_skips_the_rest_of_the_epoch(
    tmp_path, make_shards, tiny_flags, monkeypatch, capsys
):
    """Another worker count splits the shards differently: the rest of the epoch is skipped, none is read twice."""
    common = ["--data", make_shards(tmp_path / "shards"), *tiny_flags[:-1], "2", "--max-steps", "8"]
    with monkeypatch.context() as patch:
        stop_at(patch, 3)
        run_train([*common, "--out", str(tmp_path / "other")])
    capsys.readouterr()
    summary = run_train(["--out", str(tmp_path / "other"), "--resume", "--workers", "0", "--log-every", "1"])
    err = capsys.readouterr().err  # the warning says what changed
    assert "since the checkpoint: readers per process (--workers) 2 -> 1; the rest of epoch 0 is skipped" in err
    assert "(no shard is read twice); epoch 1 starts" in err
    assert summary["step"] == 8 and rows_of(tmp_path / "other")[1]["epoch"] == pytest.approx(1 + 1 / 6)


def test_hf_resume_is_bitwise(tmp_path, make_hf_saved, tiny_flags, monkeypatch, capsys):
    data = "hf:" + str(make_hf_saved(tmp_path / "saved"))  # 24 rows, row 5 broken
    common = ["--data", data, *tiny_flags, "--max-steps", "8", "--log-every", "4"]
    assert run_train([*common, "--out", str(tmp_path / "full")])["exit_code"] == 0
    assert "passed over so far" in capsys.readouterr().err  # the broken row, in the first epoch
    with monkeypatch.context() as patch:
        stop_at(patch, 3)
        assert run_train([*common, "--out", str(tmp_path / "split")])["step"] == 3
    assert run_train(["--out", str(tmp_path / "split"), "--resume", "--workers", "0", "--log-every", "4"])["step"] == 8
    assert_same_learner(tmp_path / "full" / "last.pt", tmp_path / "split" / "last.pt")


def one_error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("byol-pytorch: error: ") and "Traceback" not in lines[0]
    return lines[0]


def test_data_errors_are_one_line(tmp_path, make_hf_saved, make_shards, tiny_flags, monkeypatch, capsys):
    base = ["train", "--out", str(tmp_path / "run"), *tiny_flags]
    two = "hf:" + str(make_hf_saved(tmp_path / "two", rows=8, broken=None, extra_image=True))
    pattern = make_shards(tmp_path / "shards", shards=2, broken=False)
    capsys.readouterr()  # the builders' progress bars
    assert cli.main([*base, "--data", two]) == 1
    assert "several image columns: image, mask; choose one (--image-column NAME)" in one_error_line(capsys)
    assert cli.main([*base, "--data", "hf:someone/cats"]) == 1
    assert "only local paths are supported" in one_error_line(capsys)
    assert cli.main([*base[:-1], "4", "--data", pattern]) == 1
    assert "2 shards cannot be split between 1 process(es) x 4 loader worker(s)" in one_error_line(capsys)
    assert cli.main([*base, "--data", pattern, "--shuffle-buffer", "-1"]) == 1
    assert "--shuffle-buffer must be 0 or more" in one_error_line(capsys)

    monkeypatch.setitem(sys.modules, "webdataset", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert cli.main([*base, "--data", pattern]) == 1
    assert 'need the webdataset package: pip install "byol-pytorch[shards]"' in one_error_line(capsys)
    assert cli.main([*base, "--data", two]) == 1
    assert 'needs the datasets package: pip install "byol-pytorch[datasets]"' in one_error_line(capsys)


def test_the_default_shard_workers_keep_half_the_processes_and_say_so(tmp_path, make_shards, capsys):
    """Review: 9 shards (8 full, 1 short) on 8 CPUs got 1 loader worker (the most samples an epoch, an eighth of
    the decoding), and nothing said so."""
    from byol_pytorch.app.train import _default_shard_workers
    from byol_pytorch.data.shards import ShardDataset
    from byol_pytorch.training.distributed import DistContext

    pattern = make_shards(tmp_path / "s", per_shard=[10] * 8 + [6], broken=False)
    data = ShardDataset(pattern, 8, batch_size=2, workers=1)
    chosen = _default_shard_workers(data, 8, DistContext(), None)
    assert chosen.per_rank == 4 and chosen.batches_per_epoch == 32  # 8 workers: 24 batches; 1 worker: 43
    line = capsys.readouterr().out
    assert "4 loader worker(s) per process read the 9 shards (of up to 8: 4 readers divide them more evenly)" in line
    assert _default_shard_workers(data, 8, DistContext(), 3).per_rank == 3  # a resumed run's readers are kept
    wide = ShardDataset(pattern, 8, batch_size=8, workers=1)
    assert _default_shard_workers(wide, 8, DistContext(), 9).per_rank == 4  # unless they make no step: chosen
