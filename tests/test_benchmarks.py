"""The benchmark scripts keep working: each ``--smoke`` run prints the expected table.

The scripts are benchmarks, not tests (their numbers live in benchmarks/results/); here
they run with tiny sizes and the tables are checked for their rows and for positive
measurements. The peer (lucidrains/byol-pytorch) is installed into .bench/peer on first
use; without it and without network its rows must be skipped with a message, not fail.
benchmarks/ is a package run from the repository root (``python -m benchmarks.NAME``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import markdown_rows as _rows

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _load(name: str) -> ModuleType:
    """``benchmarks.NAME``, imported from the repository root (as ``python -m benchmarks.NAME`` runs it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO))  # `pytest` alone does not put the root on the path; `python -m pytest` does
        return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="module")
def peer_available() -> bool:
    peer = _load("common.peer")
    try:
        peer.load_peer()
    except peer.PeerUnavailable as error:
        print(f"peer unavailable, its rows must be skipped: {error}")
        return False
    return True


def _sources() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in sorted(BENCHMARKS.rglob("*.py"))}


def test_benchmarks_edit_no_import_path_and_import_no_private_name():
    """A package run with -m: no sys.path edits (bar the peer's own dependencies), no byol_pytorch._private."""
    sources = _sources()
    assert "benchmarks/__init__.py" in sources and "benchmarks/common/__init__.py" in sources
    edits = {
        (path, line.strip())
        for path, text in sources.items()
        for line in text.splitlines()
        if re.search(r"sys\.path\.(insert|append)|sys\.path\s*(\+?=|\[)", line)
    }
    # The one exception: the peer's isolated dependencies (einops), appended after everything else.
    assert {path for path, _ in edits} <= {"benchmarks/common/peer.py"}, edits
    assert all(line.startswith("sys.path.append(str(deps))  # peer deps") for _, line in edits), edits
    private = []
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("byol_pytorch"):
                names = [node.module, *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("byol_pytorch")]
            else:
                continue
            if any(part.startswith("_") for name in names for part in name.split(".")):
                private.append(f"{path}:{node.lineno}")
        private += [f"{path}: byol_pytorch._" for _ in re.findall(r"byol_pytorch\._", text)]
    assert not private, private


def test_benchmark_functions_are_at_most_80_lines():
    """Thin scripts over shared pieces: no function body longer than 80 lines (its docstring not counted)."""
    long = []
    for path, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                if body and body[-1].end_lineno - body[0].lineno + 1 > 80:
                    long.append(f"{path}:{node.lineno} {node.name}")
    assert not long, long


def test_readme_lists_every_script_with_its_module_command():
    readme = (BENCHMARKS / "README.md").read_text()
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")
    assert len(scripts) >= 10
    for name in scripts:
        assert f"python -m benchmarks.{name}" in readme, name
        assert f"`{name}.py`" in readme, name
    assert not re.search(r"^(nohup |OMP_NUM_THREADS=1 )?python benchmarks/", readme, re.M)  # no command by path


def test_command_line_is_the_module_form(monkeypatch):
    report = _load("common.report")
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "quality.py"), "--smoke", "--out", "a b.md"])
    assert report.command_line() == "python -m benchmarks.quality --smoke --out 'a b.md'"


def test_peer_is_loaded_beside_our_package(peer_available):
    if not peer_available:
        pytest.skip("lucidrains/byol-pytorch is not installed in .bench/peer and pip could not install it")
    code = (
        "import sys; from benchmarks.common.peer import load_peer; peer = load_peer(install=False); "
        "import byol_pytorch; print(peer.__file__); print(byol_pytorch.__file__); "
        "print('accelerate' in sys.modules, hasattr(peer, 'BYOL'), hasattr(byol_pytorch, 'BYOLAugment'))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    peer_file, ours_file, flags = result.stdout.split("\n")[:3]
    assert Path(peer_file).parts[-4:] == (".bench", "peer", "byol_pytorch", "byol_pytorch.py")
    assert ".bench" not in Path(ours_file).parts  # our package is not shadowed
    assert flags == "False True True"  # accelerate never imported; both BYOLs there


def test_train_step_smoke(peer_available, tmp_path):
    script = _load("train_step")
    out = tmp_path / "train_step.md"
    table = script.main(script.get_args_parser().parse_args(["--smoke", "--out", str(out)]))
    rows = _rows(table, "contender", key_cells=2)
    expected = [
        "floor/eager",
        "ours/eager",
        "ours, views in one batch/eager",
        "ours, engine (the CLI's step)/eager",
    ] + (["peer vanilla/eager", "peer defaults/eager"] if peer_available else [])
    assert sorted(rows) == sorted(expected)
    for name in expected:
        wall_ms, cpu_ms, images_per_s, peak_mib = (float(v) for v in rows[name][2:6])
        assert wall_ms > 0 and cpu_ms > 0 and images_per_s > 0 and peak_mib > 0, rows[name]
    # images/s is B / the CPU-time median on the CPU
    assert float(rows["ours/eager"][4]) == pytest.approx(4 / (float(rows["ours/eager"][3]) / 1e3), rel=0.01)
    assert float(rows["ours/eager"][5]) > float(rows["floor/eager"][5])  # heads, target, Adam state
    if not peer_available:
        assert "Peer rows skipped" in table
    parts = _rows(table, "part")
    assert "per-view forwards (floor per view - floor)" in parts and "rest (ours - floor - parts)" in parts
    for name in ("floor (bare backbone)", "views", "heads", "ema", "ours"):
        assert float(parts[name][1]) > 0
    text = out.read_text()
    assert "Machine:" in text and "torch " in text and "Command:" in text and "### Goals" in text


def test_ema_smoke(peer_available, tmp_path):
    script = _load("ema")
    table = script.main(script.get_args_parser().parse_args(["--smoke", "--devices", "cpu"]))
    rows = _rows(table, "device", key_cells=2)
    expected = ["cpu/ours (foreach lerp)", "cpu/in-place loop"] + (["cpu/peer loop"] if peer_available else [])
    assert sorted(rows) == sorted(expected)
    for name in expected:
        assert all(float(v) > 0 for v in rows[name][2:5]), rows[name]  # wall ms, CPU ms, GB/s
    assert rows["cpu/ours (foreach lerp)"][5] == "1.00x"


def test_construction_smoke(tmp_path):
    """The construction benchmark times the construction and the training-mode check's work, and writes its table."""
    script = _load("construction")
    out = tmp_path / "construction.md"
    table = script.main(script.get_args_parser().parse_args(["--smoke", "--threads", "1", "--out", str(out)]))
    row = _rows(table, "net")["resnet18 (torchvision), 32 px"]
    assert float(row[1]) > float(row[2]) > 0 and row[3].endswith("%")  # the check is a part of the whole
    assert out.read_text().startswith("# Construction")


def test_ema_contenders_compute_the_same_average(peer_available):
    """The three timed updates are the same arithmetic (checked on a small net)."""
    script = _load("ema")
    torch.manual_seed(0)
    calls, _ = script.contenders_for(
        torch.device("cpu"), "resnet18", sys.modules.get("peer_byol") if peer_available else None
    )
    assert set(calls) >= {"ours (foreach lerp)", "in-place loop"}
    target, online = [torch.randn(5, 3)], [torch.randn(5, 3)]
    expected = 0.99 * target[0] + 0.01 * online[0]
    script.inplace_loop(target, online, 0.99)
    torch.testing.assert_close(target[0], expected)


def test_quality_smoke(peer_available, tmp_path):
    script = _load("quality")
    out = tmp_path / "quality.md"
    table = script.main(script.get_args_parser().parse_args(["--smoke", "--threads", "1", "--out", str(out)]))
    rows = _rows(table, "contender")
    expected = ["random init", "ours"] + (["peer vanilla"] if peer_available else [])
    assert sorted(rows) == sorted(expected)
    for name in expected:
        assert 0 < float(rows[name][4]) <= 100, rows[name]  # kNN top-1 %
    assert int(rows["ours"][1]) == 4 and float(rows["ours"][3]) > 0  # 128 images / batch 32; the loss
    assert "REDUCED BUDGET" not in table
    assert "### Goals" in out.read_text()


def test_quality_input_is_padded_three_channel():
    script = _load("common.data")
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    x = script.prepare(images)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 1, 2:30, 2:30], images[:, 0]) and int(x[:, :, :2].max()) == 0


def test_quality_several_seeds_are_tabled_with_their_mean(tmp_path):
    import json

    script = _load("quality")
    saved = []
    for seed, contenders in ((0, "random,ours,ours1b"), (1, "random,ours")):  # the opt-in on seed 0 only
        path = tmp_path / f"seed{seed}.json"
        script.main(
            script.get_args_parser().parse_args(
                ["--smoke", "--threads", "1", "--seed", str(seed), "--contenders", contenders, "--save-json", str(path)]
            )
        )
        saved += json.loads(path.read_text())
    table = script.main(
        script.get_args_parser().parse_args(
            ["--smoke", "--load-json", str(tmp_path / "seed0.json"), str(tmp_path / "seed1.json")]
        )
    )
    rows = _rows(table, "seed")
    assert sorted(rows) == ["**mean**", "0", "1", "min / max", "std"]
    header = next(line for line in table.splitlines() if line.startswith("| seed |")).strip("| ").split(" | ")
    col = {name: i for i, name in enumerate(header)}
    accuracy = {(r["seed"], r["name"]): r["accuracy"] for r in saved}
    gains = [accuracy[(s, "ours")] - accuracy[(s, "random init")] for s in (0, 1)]
    assert float(rows["1"][col["ours"]]) == pytest.approx(accuracy[(1, "ours")], abs=0.006)
    assert float(rows["**mean**"][col["ours - random init"]]) == pytest.approx(sum(gains) / 2, abs=0.006)
    assert f"over 2 seeds; {sum(g >= 8 for g in gains)} of 2 seeds" in table
    # The opt-in ran on seed 0 only: its gap to ours is that seed's, and seed 1's cell is empty.
    opt_in = accuracy[(0, "ours, views in one batch")] - accuracy[(0, "ours")]
    gap = col["ours, views in one batch - ours"]
    assert float(rows["0"][gap]) == pytest.approx(opt_in, abs=0.006) and rows["1"][gap] == ""
    assert rows["**mean**"][gap].endswith(" (1 seed)")  # a mean over fewer seeds says so
    assert float(rows["**mean**"][gap].split()[0]) == pytest.approx(opt_in, abs=0.006)


def test_benchmarks_md_is_its_head_plus_the_results_files(tmp_path):
    script = _load("assemble")
    assert script.main(["--check"]) == 0, "run python -m benchmarks.assemble"
    # On a small copy: the head is kept, each results file follows with its headings one level down.
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n\nhead\n\n---\n\nstale\n")
    for name in script.SECTIONS:
        (tmp_path / "benchmarks" / "results" / f"{name}.md").write_text(f"# {name}\n\n## Notes\n\ntext of {name}\n")
    text = script.assemble(tmp_path)
    first = script.SECTIONS[0]
    assert text.startswith(f"# Benchmarks\n\nhead\n\n---\n\n## {first}\n\n### Notes\n\ntext of {first}\n\n---\n")
    assert "stale" not in text and text.count("\n---\n") == len(script.SECTIONS)


def test_data_index_contenders_list_the_same_files(tmp_path):
    """The three file lists the benchmark measures hold the same files, the cached start does not scan."""
    script = _load("data_index")
    folder = script.make_tree(tmp_path / "n300", 300, 100)
    assert sorted(p.name for p in folder.iterdir()) == [".complete", "c00000", "c00001", "c00002"]
    before = script.child("before", "start", folder, 2)
    after = script.child("after", "memory", folder, 2)  # forks two workers that read every entry
    cached = script.child("after", "cached", folder, 2)
    torchvision_ = script.child("torchvision", "start", folder, 2)
    assert before["count"] == after["count"] == cached["count"] == torchvision_["count"] == 300
    assert len(after["worker_bytes"]) == 2 and all(r["seconds"] > 0 for r in (before, after, cached))
    old = script.old_scan_images(folder)
    new = script._build("after", "cached", folder)  # raises if it had to scan
    assert list(new) == old and [Path(p) for p, _ in script._build("torchvision", "start", folder).samples] == old
    # The parent measures in fresh 1-thread `python -m benchmarks.data_index --child ...` processes.
    assert script._run_child("after", "cached", folder, 2)["count"] == 300
    (folder / "c00001" / "extra.jpg").touch()
    with pytest.raises(RuntimeError, match="the cached start scanned"):
        script._build("after", "cached", folder)


def test_data_index_goals_say_met_or_not():
    script = _load("data_index")
    after = {"start": [30.0, 70.0, 50.0], "cached": [1.0], "main": 27.0, "cached_main": 28.0, "workers": [2.0, 101.0]}
    goals = "\n".join(script._goals(10**6, after))
    assert "main process at 1,000,000 files: met (27; 28 from the cache)" in goals
    assert "each worker: NOT met (at most 101)" in goals
    assert "start-up <= 60 s: met (50.00 s, median)" in goals and "cached start <= 5 s: met (1.00 s" in goals


def test_robustness_cells_and_table(peer_available, tmp_path):
    import json

    script = _load("robustness")
    contenders = ["random", "random-bn", "ours", "ours:moving_average_decay=0.996", "ours:views=paper"]
    contenders += ["peer"] if peer_available else []
    contenders += ["lightly"] if importlib.util.find_spec("lightly") else []  # the bench extra
    base = ["--smoke", "--results", str(tmp_path), "--steps", "2", "--curve-every", "0"]
    for contender in contenders:
        script.main(script.get_args_parser().parse_args(["--cell", "mobilenetv3_small_100", "adam", contender, *base]))
    cells = {c["contender"]: c for c in (json.loads(p.read_text()) for p in tmp_path.glob("*.json"))}
    assert sorted(cells) == sorted(contenders)
    for name, cell in cells.items():
        assert 0 < cell["knn"] <= 100 and cell["steps"] == (0 if name.startswith("random") else 2)
        if not name.startswith("random"):
            assert len(cell["losses"]) == 2 and cell["images_per_s"] > 0
    # A cell of ours records the arguments it ran with: the README's loop (Adam on a mobile net), then the probe's.
    readme = {"moving_average_total_steps": 2, "moving_average_decay": 0.996}
    assert cells["ours"]["byol_kwargs"] == readme
    assert cells["ours:views=paper"]["byol_kwargs"] == {**readme, "views": "paper"}
    # Every cell is planned as done now; the table's gain is the cell's kNN minus random init's.
    plan = ["--results", str(tmp_path), "--steps", "2", "--backbones", "mobilenetv3_small_100", "--loops", "adam"]
    assert script.planned(script.get_args_parser().parse_args([*plan, "--contenders", *contenders])) == []
    table = script.main(script.get_args_parser().parse_args(["--table", "--results", str(tmp_path), "--steps", "2"]))
    row = _rows(table, "backbone", key_cells=2)["mobilenetv3_small_100/adam"]
    assert {key.split("/")[0] for key in _rows(table, "backbone", key_cells=2)} == set(script.BACKBONES)
    # --backbones: only those nets' rows (a held-out net's table)
    only = ["--table", "--results", str(tmp_path), "--steps", "2", "--backbones", "mobilenetv3_small_100"]
    only_rows = _rows(script.main(script.get_args_parser().parse_args(only)), "backbone", key_cells=2)
    assert sorted(only_rows) == sorted(f"mobilenetv3_small_100/{loop}" for loop in script.LOOPS)
    assert only_rows["mobilenetv3_small_100/adam"] == row
    header = next(line for line in table.splitlines() if line.startswith("| backbone |")).strip("| ").split(" | ")
    cell = row[header.index("ours")]
    gain = cells["ours"]["knn"] - cells["random"]["knn"]
    gain_bn = cells["ours"]["knn"] - cells["random-bn"]["knn"]
    assert cell.startswith(f"{cells['ours']['knn']:.1f} ({gain:+.1f}; {gain_bn:+.1f} vs BN-calibrated)")
    assert ("**below random init**" in cell) == (gain < 0)
    assert (f"mobilenetv3_small_100 / adam / ours ({gain:+.1f})" in table) == (gain < 0)
    # A variant of ours is a probe: not a contender's column, but a row beside plain ours.
    assert "ours:moving_average_decay=0.996" not in header and "/ ours:" not in table
    probe = _rows(table.split("Defaults probed")[1], "backbone", key_cells=3)[
        "mobilenetv3_small_100/adam/moving_average_decay=0.996"
    ]
    variant, plain = cells["ours:moving_average_decay=0.996"]["knn"], cells["ours"]["knn"]
    assert probe[4:7] == [f"{variant:.1f}", f"{plain:.1f} ({variant - plain:+.1f})", f"{cells['random']['knn']:.1f}"]


def test_robustness_table_adds_clean_batchnorm_and_before_after(tmp_path):
    import json

    script = _load("robustness")
    now, before = tmp_path / "now", tmp_path / "before"
    now.mkdir(), before.mkdir()

    def cell(folder, contender, knn, size=32, loop="sgd", **extra):
        steps = 0 if contender.startswith("random") else 200
        row = dict(backbone="resnet10t", loop="-" if steps == 0 else loop, contender=contender, seed=0, steps=steps)
        row.update(batch_size=256, image_size=size, machine="m", threads=1, knn=knn, images_per_s=10.0, **extra)
        name = f"{contender}_{size}_{loop}.json"
        (folder / name).write_text(json.dumps(row))

    cell(now, "random", 60.0)
    cell(now, "random-bn", 62.0)
    cell(now, "random", 99.0, size=64)  # another image size: not in the 32 px table
    cell(now, "ours", 70.0, knn_clean_bn=71.5, knn_target=69.0, knn_target_clean_bn=None)
    cell(now, "peer", 66.0)
    cell(before, "ours", 67.0)
    args = ["--table", "--results", str(now), "--before", str(before)]
    table = script.main(script.get_args_parser().parse_args(args))
    main = _rows(table, "backbone | loop | random init", key_cells=2)["resnet10t/sgd"]
    assert main[2] == "60.0"  # the 64 px random cell is left out
    clean = _rows(table.split("Clean BatchNorm")[1], "backbone", key_cells=3)["resnet10t/sgd/ours"]
    assert clean[4:] == ["70.0", "71.5 (+1.5)", "69.0 (-1.0)", "-"]
    change = _rows(table.split("Ours before and after")[1], "backbone", key_cells=2)["resnet10t/sgd"]
    assert change[2:] == ["67.0", "70.0", "+3.0", "66.0", "-"]
    middle = tmp_path / "middle"
    middle.mkdir()
    cell(middle, "ours", 68.5)
    table = script.main(script.get_args_parser().parse_args([*args, "--before", str(middle)]))
    assert "| ours in before | ours in middle | ours now | change |" in table
    change = _rows(table.split("Ours before and after")[1], "backbone", key_cells=2)["resnet10t/sgd"]
    assert change[2:] == ["67.0", "68.5", "70.0", "+3.0", "66.0", "-"]  # the change since the first


def test_robustness_document_is_made_from_the_cells_and_keeps_what_is_written_by_hand(tmp_path, monkeypatch):
    import json

    script = _load("robustness")
    assert script.write_document(check=True) == 0, "run python -m benchmarks.robustness --document"
    # On cells of its own: a main folder, an empty "before" one and a held-out net's folder.
    main, held, before = tmp_path / "main", tmp_path / "held", tmp_path / "before"
    for folder in (main, held, before):
        folder.mkdir()

    def cell(folder, backbone, contender, knn, loop="sgd"):
        steps = 0 if contender.startswith("random") else 200
        row = dict(backbone=backbone, loop="-" if steps == 0 else loop, contender=contender, seed=0, steps=steps)
        row.update(batch_size=256, image_size=32, machine="m", threads=1, knn=knn, images_per_s=10.0)
        if steps:  # the collapse alarm's figures, as a cell of ours records them
            row.update(monitor=[[steps, 0.5, 12.0]], representation_rank=20.0)
        (folder / f"{backbone}_{loop}_{contender}.json").write_text(json.dumps(row))

    cell(main, "resnet10t", "random", 60.0)
    cell(main, "resnet10t", "ours", 70.0)
    cell(held, "regnety_002", "random", 10.0)
    cell(held, "regnety_002", "ours", 59.0, loop="cli")
    cell(held, "regnety_002", "ours:optimizer=sgd", 50.0, loop="cli")  # not the RegNets' LARS: a probe
    monkeypatch.setattr(script, "RESULTS", main)
    monkeypatch.setattr(script, "BACKBONES", ("resnet10t",))
    monkeypatch.setattr(script, "BEFORE", (before,))
    held_out = script.Section("A held-out net (RegNetY)", "RegNetY", ("regnety_002",), held)
    monkeypatch.setattr(script, "SECTIONS", (held_out,))
    first = script.document("# Matrix\n\nwhat it is\n")
    assert first.startswith("# Matrix\n\nwhat it is\n\n### kNN top-1 % after 200 steps")
    main_heading = re.search(r"^### kNN top-1.*$", first, flags=re.M).group(0)
    assert "| resnet10t | sgd | 60.0 |" in first and "| resnet10t | adam | 60.0 | - | - |" in first
    assert "### A held-out net (RegNetY): kNN top-1 % after 200 steps" in first
    assert "### RegNetY: defaults probed" in first  # the section's later headings carry its short name
    assert "| regnety_002 | cli | 10.0 |" in first
    assert "| regnety_002 | sgd |" not in first  # in a section, a loop with no cell has no row
    assert first.count("### The collapse alarm") == 1  # the main table's alone
    # Sections written by hand stay after the generated one they followed when a cell changes,
    # right after the head, and two in a row after a held-out net's probes.
    hand = "### Where the bar stands (written by hand)\n\nours leads by 10.0\n"
    more = "### And what is next (written by hand)\n\nmore seeds\n"
    current = first.replace(main_heading, hand + "\n" + main_heading, 1)
    current = current.replace("\n### The collapse alarm", "\n" + hand + "\n### The collapse alarm", 1)
    current = current.rstrip("\n") + "\n\n" + hand + "\n" + more
    cell(main, "resnet10t", "ours", 72.0)
    again = script.document(current)
    assert "| resnet10t | sgd | 60.0 | - | 72.0 (+12.0;" in again
    assert again.startswith("# Matrix\n\nwhat it is\n\n" + hand + "\n" + main_heading)
    assert again.count(hand) == 3 and again.endswith("\n" + hand + "\n" + more)
    second = again.index(hand, again.index(main_heading))
    assert second + len(hand) + 1 == again.index("### The collapse alarm")
    assert script.document(again) == again  # made from the same cells, the same text
    # --check says so when the file on disk is stale, and --document brings it up to date.
    monkeypatch.setattr(script, "REPO", tmp_path)
    monkeypatch.setattr(script, "DOCUMENT", tmp_path / "robustness.md")
    script.DOCUMENT.write_text(current)
    assert script.write_document(check=True) == 1 and script.DOCUMENT.read_text() == current
    assert script.write_document() == 0 and script.DOCUMENT.read_text() == again
    assert script.write_document(check=True) == 0
    # A hand-written section after a heading the cells no longer make has no place to go: it is named.
    orphan = again.replace(main_heading, "### A table the cells no longer make", 1)
    with pytest.raises(
        ValueError, match="'### Where the bar stands .written by hand.' followed a section the cells no"
    ):
        script.document(orphan)
    with pytest.raises(ValueError, match="no head before its first"):
        script.document("### Where the bar stands (written by hand)\n\ntext\n")
    monkeypatch.setattr(script, "SECTIONS", (held_out, held_out))  # two sections named alike
    with pytest.raises(ValueError, match="two generated sections share the heading .### A held-out net"):
        script.document(again)
    # --document rebuilds the whole file at the matrix's settings: a selection next to it is refused.
    with pytest.raises(SystemExit):
        script.main(script.get_args_parser().parse_args(["--document", "--steps", "1000"]))


def test_robustness_cli_row_takes_the_probe_that_is_the_family_default(tmp_path):
    import json

    script = _load("robustness")

    def cell(contender, knn, backbone="resnet10t", seed=0):
        steps = 0 if contender.startswith("random") else 200
        row = dict(backbone=backbone, loop="-" if steps == 0 else "cli", contender=contender, seed=seed, steps=steps)
        row.update(batch_size=256, image_size=32, machine="m", threads=1, knn=knn, images_per_s=10.0)
        (tmp_path / f"{backbone}_{contender}_{seed}.json").write_text(json.dumps(row))

    for backbone in ("resnet10t", "regnetx_002"):
        cell("random", 60.0, backbone)
    cell("ours:optimizer=sgd", 73.0)  # train's choice for ResNets: the cli row of ours
    cell("ours:optimizer=lars", 50.0)  # not the family's choice: a probe only
    cell("ours:optimizer=sgd", 40.0, "regnetx_002")  # RegNets take LARS: a probe only
    cell("ours", 52.0, "regnetx_002", seed=1)
    cell("ours", 77.0, seed=1)  # a real cli cell of another seed: the seed-0 probe still counts
    table = script.main(script.get_args_parser().parse_args(["--table", "--results", str(tmp_path)]))
    rows = _rows(table, "backbone | loop | random init", key_cells=2)
    assert rows["resnet10t/cli"][4].startswith("75.0 ± 2.8 (n 2) (+15.0;")  # the probe's 73.0 and the cell's 77.0
    assert rows["regnetx_002/cli"][4].startswith("52.0 (-8.0;")  # the real cell alone, not the SGD probe
    named = "taken from the probe that sets what `train` picks for the family: resnet10t seed 0: `ours:optimizer=sgd`"
    assert named + "\n\nBelow random init" in table  # right under the main table
    probes = _rows(table.split("Defaults probed")[1], "backbone", key_cells=3)
    assert probes["resnet10t/cli/optimizer=sgd"][5] == "-"  # not compared with itself
    assert probes["resnet10t/cli/optimizer=lars"][5] == "73.0 (-23.0)"  # other probes: against the family's choice
    cell("ours", 75.0)  # a real cli cell of the same backbone and seed wins over the probe
    table = script.main(script.get_args_parser().parse_args(["--table", "--results", str(tmp_path)]))
    assert _rows(table, "backbone | loop | random init", key_cells=2)["resnet10t/cli"][4].startswith("76.0 ± 1.4 (n 2)")
    assert "taken from the probe" not in table
    probes = _rows(table.split("Defaults probed")[1], "backbone", key_cells=3)
    assert probes["resnet10t/cli/optimizer=sgd"][5] == "75.0 (-2.0)"


def test_robustness_cli_row_of_a_family_with_its_own_lr_takes_that_lr(tmp_path):
    import json

    from byol_pytorch.app.recipe import MOBILE_LR_PER_256

    script = _load("robustness")

    def cell(contender, knn, steps=200):
        row = dict(backbone="mobilenetv2_050", loop="-" if steps == 0 else "cli", contender=contender, seed=0)
        row.update(steps=steps, batch_size=256, image_size=32, machine="m", threads=1, knn=knn, images_per_s=1.0)
        (tmp_path / f"{contender}_{knn}.json").write_text(json.dumps(row))

    cell("random", 40.0, steps=0)
    cell("ours:optimizer=sgd", 25.0)  # SGD at its own default lr: a probe, not what train picks here
    cell("ours:optimizer=sgd,lr=0.05", 26.0)
    cell(f"ours:optimizer=sgd,lr={MOBILE_LR_PER_256}", 50.0)  # the family's optimiser at the family's lr
    args = ["--table", "--results", str(tmp_path), "--backbones", "mobilenetv2_050"]
    table = script.main(script.get_args_parser().parse_args(args))
    row = _rows(table, "backbone | loop | random init", key_cells=2)["mobilenetv2_050/cli"]
    assert row[4].startswith("50.0 (+10.0;")  # the probe at the family's lr, not the two at 0.05
    assert f"mobilenetv2_050 seed 0: `ours:optimizer=sgd,lr={MOBILE_LR_PER_256}`" in table


def test_robustness_gains_are_against_the_baseline_of_the_same_seed(tmp_path):
    """A run starts from its seed's random weights: its gain is over that seed's untouched net, not the mean of
    every seed's (seed 3's lucky untouched net would otherwise count against seeds 0 and 1)."""
    import json

    script = _load("robustness")

    def cell(contender, knn, seed):
        steps = 0 if contender.startswith("random") else 200
        row = dict(backbone="mobilenetv2_050", loop="-" if steps == 0 else "cli", contender=contender, seed=seed)
        row.update(steps=steps, batch_size=256, image_size=32, machine="m", threads=1, knn=knn, images_per_s=1.0)
        (tmp_path / f"{contender}_{seed}.json").write_text(json.dumps(row))

    for seed, knn in enumerate([42.0, 43.0, 47.0, 58.0]):
        cell("random", knn, seed)
    cell("random-bn", 18.0, 0)  # one seed of the other baseline: seed 1 falls back to it
    cell("ours", 50.0, 0)
    cell("ours", 45.0, 1)
    cell("ours", 40.0, 4)  # a seed with no untouched net: against the mean of the four that ran (47.5)
    args = ["--table", "--results", str(tmp_path), "--backbones", "mobilenetv2_050"]
    table = script.main(script.get_args_parser().parse_args(args))
    row = _rows(table, "backbone | loop | random init", key_cells=2)["mobilenetv2_050/cli"]
    paired = statistics.mean([50.0 - 42.0, 45.0 - 43.0, 40.0 - 47.5])
    assert paired == pytest.approx(0.8333, abs=1e-3)
    assert row[2].startswith("47.5 ± ")  # the column still shows every seed's untouched net
    assert row[4].startswith(f"45.0 ± 5.0 (n 3) (+{paired:.1f}; +{45.0 - 18.0:.1f} vs BN-calibrated)")
    assert "mobilenetv2_050 / cli / ours" not in table.split("Below random init:")[1].split("\n")[0]


def test_robustness_batchnorm_calibration_is_the_mean_of_the_views_statistics():
    script = _load("robustness")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    weights = [p.detach().clone() for p in net.parameters()]
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    data = _load("common.data").Data(images, torch.zeros(12), images, torch.zeros(12), "test")
    seen = []
    hook = net[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    script.calibrate_batchnorm(net, data, batches=3, batch_size=4)
    hook.remove()
    assert len(seen) == 3 and net.training and net[1].momentum == 0.1
    means = torch.stack([x.mean((0, 2, 3)) for x in seen]).mean(0)  # a cumulative average of batch means
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen]).mean(0)
    torch.testing.assert_close(net[1].running_mean, means)
    torch.testing.assert_close(net[1].running_var, variances)
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))


def test_robustness_frozen_batchnorm_probe_freezes_every_backbone_layer(tmp_path):
    """The probe ``bn=frozen`` (the library's ``freeze_batchnorm_statistics``, tested in test_batchnorm.py) in a
    cell: every BatchNorm layer of the backbone counted another way, the run taken; another value refused."""
    import json

    import timm

    script = _load("robustness")
    base = ["--smoke", "--results", str(tmp_path), "--steps", "4", "--curve-every", "0"]
    script.main(script.get_args_parser().parse_args(["--cell", "resnet10t", "cli", "ours:bn=frozen", *base]))
    cell = json.loads(next(tmp_path.glob("*__cli__ours--bn-frozen__*.json")).read_text())
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in resnet.modules())
    assert cell["frozen_batchnorm_layers"] == norms > 0 and len(cell["losses"]) == 4
    with pytest.raises(SystemExit, match="the probe bn= takes 'frozen'"):
        script.main(script.get_args_parser().parse_args(["--cell", "resnet10t", "cli", "ours:bn=clean", *base]))


def test_robustness_cli_loop_builds_what_the_cli_builds():
    """The `cli` loop: the learner, optimiser and schedules `byol-pytorch train` resolves at 32 px, batch 256."""
    import timm

    from byol_pytorch.app.recipe import RECIPE_DEFAULTS
    from byol_pytorch.training.optim import LARS, OPTIMIZERS

    script = _load("robustness")
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    learner, optimizer, scheduler = script.cli_recipe(net, 100, {}, model="regnetx_002")  # a LARS family
    assert isinstance(optimizer, LARS) and learner.net is net
    assert learner.moving_average_decay == RECIPE_DEFAULTS["tau_base"] == 0.996
    assert learner.moving_average_total_steps == 100
    peak = OPTIMIZERS["lars"]["lr_per_256"]  # x 256 / 256
    decays = {g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {0.0, OPTIMIZERS["lars"]["weight_decay"]}  # biases and norms are not decayed
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Linear warm-up over the first tenth of the run, then a cosine down to 0.
    assert lrs[:10] == pytest.approx([peak * (i + 1) / 10 for i in range(10)])
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01 * peak
    assert lrs[55] == pytest.approx(peak * 0.5, rel=0.05)
    # A flag passed as a keyword changes the recipe the way the CLI's flag does.
    _, adamw, _ = script.cli_recipe(net, 100, {"optimizer": "adamw"})
    assert isinstance(adamw, torch.optim.AdamW)
    _, sgd, _ = script.cli_recipe(net, 100, {}, model="resnet10t")  # the ResNets' choice: SGD 0.05, momentum 0.9
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    switched, _, _ = script.cli_recipe(net, 100, {"views_in_one_batch": True})  # a switch: the flag alone
    assert switched.views_in_one_batch and not learner.views_in_one_batch
    with pytest.raises(SystemExit):
        script.cli_recipe(net, 100, {"no_such_flag": 1})


def test_robustness_cell_records_the_alarm_figures(tmp_path):
    import json

    script = _load("robustness")
    base = ["--smoke", "--results", str(tmp_path), "--steps", "10", "--curve-every", "5"]
    for contender in ("random", "ours"):
        script.main(script.get_args_parser().parse_args(["--cell", "resnet10t", "cli", contender, *base]))
    cell = json.loads(next(tmp_path.glob("*__cli__ours__*.json")).read_text())
    assert [m[0] for m in cell["monitor"]] == [10]  # every MONITOR_EVERY steps
    std, rank = cell["monitor"][0][1:]
    assert 0.05 < std < 1.5 and 1 <= rank <= 32  # std in units of 1/sqrt(D); 32 smoke rows at most
    assert len(cell["curve"]) == len(cell["curve_rank"]) == 1 and 1 <= cell["representation_rank"] <= 512
    table = script.main(script.get_args_parser().parse_args(["--table", "--results", str(tmp_path), "--steps", "10"]))
    random_cell = json.loads(next(tmp_path.glob("*__random__*.json")).read_text())
    alarm = _rows(table.split("The collapse alarm's figures")[1], "backbone", key_cells=3)["resnet10t/cli/ours"]
    verdict = "below" if cell["knn"] < random_cell["knn"] else "above"
    assert alarm[4] == f"{std:.2f}" and alarm[8] == f"{cell['knn']:.1f} ({verdict} random init)" and alarm[9] == "none"
    assert f"(random {random_cell['representation_rank']:.1f})" in alarm[7]
    # Read with a shorter budget, the 10-step cell is a longer run: its kNN along the run, and where it
    # first reaches the random net's.
    assert "Past the budget" not in table
    shorter = script.main(script.get_args_parser().parse_args(["--table", "--results", str(tmp_path), "--steps", "5"]))
    longer = _rows(shorter.split("Past the budget")[1], "backbone", key_cells=3)["resnet10t/cli/ours"]
    (step, mid), bar = cell["curve"][0], random_cell["knn"]
    assert step == 5 and longer[4] == f"5: {mid:.1f}; 10: {cell['knn']:.1f}" and longer[5] == f"{bar:.1f}"
    reached = [s for s, acc in ((5, mid), (10, cell["knn"])) if acc >= bar]
    assert longer[6] == (f"step {reached[0]}" if reached else "never")


def test_robustness_plan_prints_module_commands(tmp_path, capsys):
    script = _load("robustness")
    plan = ["--plan", "--results", str(tmp_path), "--backbones", "resnet10t", "--loops", "sgd", "--image-size", "64"]
    script.main(script.get_args_parser().parse_args(plan))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "python -m benchmarks.robustness --cell resnet10t adam random --seed 0 --steps 200 " + (
        f"--results {tmp_path.resolve()} --image-size 64"
    )
    assert [line.split()[4:7] for line in lines] == [
        ["resnet10t", "adam", "random"],
        ["resnet10t", "adam", "random-bn"],
        ["resnet10t", "sgd", "ours"],
        ["resnet10t", "sgd", "peer"],
    ]


def test_robustness_plan_counts_a_probe_of_the_cli_default_as_its_cell(tmp_path, capsys):
    """A docs probe: --plan listed 6 cli cells that the table fills from probes of the family's default recipe
    (``cli_defaults``), and --run would have run them again, 17 minutes each."""
    import json

    from byol_pytorch.app.recipe import family_lr, optimizer_for

    script = _load("robustness")
    per_256 = family_lr("mobilenetv3_small_100")  # the cell's batch is 256
    default = f"ours:optimizer={optimizer_for('mobilenetv3_small_100')[0]}" + (f",lr={per_256:g}" if per_256 else "")
    cell = {"backbone": "mobilenetv3_small_100", "loop": "cli", "seed": 0, "steps": 200, "batch_size": 256}
    (tmp_path / "probe.json").write_text(json.dumps({**cell, "contender": default, "knn": 60.0}))
    plan = ["--plan", "--results", str(tmp_path), "--backbones", "mobilenetv3_small_100", "--loops", "cli"]
    args = script.get_args_parser().parse_args([*plan, "--seeds", "0", "1"])
    assert [c for c in script.planned(args) if c[1:3] == ["cli", "ours"]] == [
        ["mobilenetv3_small_100", "cli", "ours", "1"]
    ]
    assert script.cli_defaults([{**cell, "contender": default, "knn": 60.0}], [])  # the table takes it as the cell


def test_robustness_view_probes_feed_ours_the_contenders_views(peer_available):
    """``ours:views=peer|lightly``: our learner, their views; ``draw=batch``, ``loss_scale``: one part of theirs."""
    import argparse

    script = _load("robustness")
    data = script.load_data(argparse.Namespace(smoke=True, image_size=32))
    same = data.train_x[:1].expand(8, -1, -1, -1)  # one image eight times
    assert script.probe_views({}, 32) == {}  # no view key: the learner's own views
    assert len({tuple(v.flatten().tolist()) for v in script.BYOLAugment(32)(same)}) == 8  # ours: drawn per image
    batch_drawn = script.probe_views({"draw": "batch"}, 32)
    torch.manual_seed(0)
    views = batch_drawn["augment_fn"](same)  # ours' settings, one draw for the batch: eight equal views
    assert torch.equal(views, views[:1].expand_as(views)) and batch_drawn["augment_fn2"].solarize_p == 0.2
    assert not torch.equal(views[0], script.BYOLAugment(32).normalize(same[:1].float() / 255)[0])  # still a view
    crop_drawn = script.probe_views({"draw": "crop"}, 32)["augment_fn"]
    params = crop_drawn.sample_params(64, 32, 32)  # one crop and flip for the batch, colour drawn per image
    assert torch.equal(params.boxes, params.boxes[:1].expand_as(params.boxes))
    assert params.flip.unique().numel() == 1 and params.brightness.unique().numel() > 1
    if peer_available:
        peer = script.probe_views({"views": "peer"}, 32)
        assert peer["augment_fn"] is peer["augment_fn2"]  # the peer's one pipeline for both views
        torch.manual_seed(0)
        views = peer["augment_fn"](same.float() / 255)
        assert views.shape == (8, 3, 32, 32) and torch.equal(views, views[:1].expand_as(views))  # drawn per batch
    losses = []
    for probe in ({}, {"loss_scale": 0.25}):  # lightly's loss is a quarter of the paper's
        args = argparse.Namespace(loop="adam", image_size=32)
        learner = script._byol_learner("ours", probe, script.make_net("resnet10t", 0), data, args)[0]
        torch.manual_seed(1)
        losses.append(learner(data.train_x[:8]))
    assert torch.allclose(losses[1], losses[0] / 4)
    assert probe == {"loss_scale": 0.25}  # left whole: run_cell records the dict it passed
    if importlib.util.find_spec("lightly") is None:  # the bench extra
        return
    kwargs = script.probe_views({"views": "lightly", "moving_average_total_steps": 2}, 32)
    learner, _ = script.make_learner("ours", script.make_net("resnet10t", 0), 32, None, **kwargs)
    args = argparse.Namespace(batch_size=16, seed=0)
    seen = []
    learner.online_encoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    batch = next(script._batches(learner, data, args, torch.Generator(), 0))
    first, second = learner.augment1.view, learner.augment2.view
    assert batch is first and first.shape == second.shape == (16, 3, 32, 32) and not torch.equal(first, second)
    assert first.dtype == torch.float32 and first.min() < 0  # lightly's normalised tensors, not uint8
    learner(batch).backward()
    assert torch.equal(seen[0], first) and torch.equal(seen[1], second)
    for probe in ({"view.blur_p": 0.0}, {"draw": "batch"}):
        with pytest.raises(SystemExit, match="takes no view.SETTING nor draw"):
            script.probe_views({"views": "lightly", **probe}, 32)


def test_ours_and_lightlys_byol_are_one_computation():
    """Same weights, batches and tau: ours' training step is lightly's (the matrix's own ``lightly_step``).

    The matrix's ours-against-lightly gaps are then not the learner's arithmetic. Lightly moves
    the target before each forward, ours after each step: given the same tau per update, the
    losses agree step by step (ours' is 4 x lightly's + 4: two directions of 2 - 2 cos against a
    mean of two -cos) and so do the target networks. Both views in one BatchNorm batch (the
    incumbent's way) is another computation, and the same check sees it.
    """
    pytest.importorskip("lightly")  # the bench extra
    import copy

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import update_momentum

    from byol_pytorch import BYOL
    from byol_pytorch.ema import cosine_tau

    contenders, script = _load("common.contenders"), _load("robustness")
    steps = 6

    def gaps(views_in_one_batch: bool) -> tuple[list[float], float]:
        torch.manual_seed(0)  # conv without bias before BatchNorm: no parameter with a zero gradient
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )  # fmt: skip
        theirs = contenders.LightlyBYOL(copy.deepcopy(net), 16)
        ours = BYOL(
            copy.deepcopy(net), 16, augment_fn=script.GivenView(), augment_fn2=script.GivenView(),
            moving_average_decay=0.996, moving_average_total_steps=steps, views_in_one_batch=views_in_one_batch,
        )  # fmt: skip
        ours.online_encoder.projector.load_state_dict(theirs.projection_head.layers.state_dict())
        ours.online_predictor.load_state_dict(theirs.prediction_head.layers.state_dict())
        opt_theirs = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
        opt_ours = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
        criterion, generator, out = NegativeCosineSimilarity(), torch.Generator().manual_seed(1), []
        for step in range(steps):
            x0, x1 = torch.randn(2, 8, 3, 16, 16, generator=generator)
            tau = cosine_tau(0.996, max(step - 1, 0), steps)  # the tau ours used after the previous step
            loss_theirs = contenders.lightly_step(theirs, criterion, opt_theirs, x0, x1, m=tau)  # the matrix's step
            ours.augment1.view, ours.augment2.view = x0, x1
            loss_ours = ours(x0)
            opt_ours.zero_grad()
            loss_ours.backward()
            opt_ours.step()
            ours.update_moving_average()
            out.append(abs(loss_ours.item() / 4 - 1 - loss_theirs.item()))
        update_momentum(theirs.backbone, theirs.backbone_momentum, m=cosine_tau(0.996, steps - 1, steps))
        target_gap = max(
            float((a - b).abs().max())
            for a, b in zip(theirs.backbone_momentum.parameters(), ours.target_encoder.net.parameters())
        )
        return out, target_gap

    losses, target = gaps(views_in_one_batch=False)
    assert max(losses) < 5e-4 and target < 2e-4, (losses, target)  # measured: 2e-5 and 2e-5
    losses, target = gaps(views_in_one_batch=True)  # BatchNorm over both views: not lightly's step
    assert max(losses) > 5e-3, losses  # measured: 1e-2 by the sixth step


def test_augment_smoke():
    pytest.importorskip("kornia")
    script = _load("augment")
    text = script.main(script.get_args_parser().parse_args(["--smoke", "--device", "cpu"]))
    rows = _rows(text, "setting", key_cells=2)
    assert sorted(rows) == ["cpu 16px from 20px/kornia", "cpu 16px from 20px/ours", "cpu 16px from 20px/torchvision"]
    assert all(float(rows[name][5]) > 0 for name in rows) and rows["cpu 16px from 20px/ours"][6] == "1.00x"
    assert text.startswith("machine: ") and "1-minute load average" in text


def test_data_loading_smoke(tmp_path):
    script = _load("data_loading")
    out = tmp_path / "data_loading.md"
    args = ["--smoke", "--workers", "0", "--cache", str(tmp_path / "cache"), "--output", str(out)]
    text = script.main(script.get_args_parser().parse_args(args))
    rows = _rows(text, "images")
    assert len(rows) == 2 and all(float(r[6].rstrip("x")) > 0 for r in rows.values())
    assert out.read_text() == text + "\n" and "Machine: " in text and "libjpeg-turbo" in text


def test_shard_loading_smoke(tmp_path):
    pytest.importorskip("webdataset")
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    script = _load("shard_loading")
    out = tmp_path / "shard_loading.md"
    args = ["--smoke", "--cache", str(tmp_path / "cache"), "--output", str(out)]
    text = script.main(script.get_args_parser().parse_args(args))
    rows = _rows(text, "source", key_cells=2)
    assert len(rows) == 6 and all(float(r[3].split()[0]) > 0 for r in rows.values())
    assert rows["image folder/1"][5] == "-" and rows["local shards/1"][5].startswith("+")
    starts = _rows(text, "start-up")
    requests = [int(r[5]) for r in starts.values()]
    assert requests[0] == requests[2] == 0 and requests[1] >= 40  # every one of the 40 shards read, without index
    assert out.read_text() == text + "\n" and "Machine: " in text


def test_backbones_runs_a_model_in_a_worker_process(tmp_path):
    """The parent feeds names to `python -m benchmarks.backbones --worker` and tables what comes back."""
    script = _load("backbones")
    results, out = tmp_path / "backbones.json", tmp_path / "backbones.md"
    argv = ["--filter", "resnet10t", "--limit", "1", "--results", str(results), "--out", str(out)]
    assert script.main(argv) == 0
    import json

    record = json.loads(results.read_text())["resnet10t"]
    assert record["status"] == "pass", record
    assert "**1 of 1 pass**" in out.read_text() and "python -m benchmarks.backbones" in out.read_text()


def test_faults_summary_groups_the_suites_rows():
    script = _load("faults_summary")
    rows = [
        {"fault": "kill", "injected": 1, "held": "resumed bitwise", "seconds": 2.0},
        {"fault": "kill", "injected": 2, "held": "resumed bitwise", "seconds": 3.5},
        {"fault": "fuzz: flags", "injected": 5, "held": "ValueError", "seconds": None},
        {"fault": "fuzz: flags", "injected": 5, "held": "ok"},
        {"fault": "fuzz: flags", "injected": 5, "held": "ValueError"},
    ]
    assert script.summarise(rows) == [
        ("kill", 3, "resumed bitwise", "3.5"),
        ("fuzz: flags", 15, "only TypeError/ValueError/FloatingPointError escaped (2 ValueError, 1 ok)", ""),
    ]


def test_demo_step_smoke(tmp_path):
    script = _load("demo_step")
    out = tmp_path / "demo_step.md"
    args = ["--smoke", "--a", "pool=1", "--b", "pool=2", "--out", str(out)]
    text = script.main(script.get_args_parser().parse_args(args))
    rows = _rows(text, "setting")
    assert rows["A"][1] == "pool=1" and rows["B"][1] == "pool=2"
    assert rows["A"][2] == rows["B"][2] == "16"  # --smoke's batch
    a_ms, b_ms = float(rows["A"][3]), float(rows["B"][3])
    ratio = float(re.search(r"B / A: ([0-9.]+)x", text).group(1))
    assert a_ms > 0 and b_ms > 0 and ratio == pytest.approx(b_ms / a_ms, rel=0.05)  # ms printed to 0.01
    assert out.read_text().startswith("# The demo's step under two settings\n\nMachine: ")
    with pytest.raises(SystemExit, match="'poll' is not a demo setting"):
        script.main(script.get_args_parser().parse_args(["--smoke", "--b", "poll=2"]))
    # the defaults time two settings (a docs probe: the demo against itself); the same two are refused
    defaults = script.get_args_parser().parse_args(["--smoke"])
    assert script._settings(defaults.a, True) != script._settings(defaults.b, True)
    with pytest.raises(SystemExit, match="settings A and B are the same"):
        script.main(script.get_args_parser().parse_args(["--smoke", "--a", "pool=2", "--b", "pool=2"]))
    with pytest.raises(SystemExit, match="--pool must be positive, got 0"):  # the demo's own checks
        script.main(script.get_args_parser().parse_args(["--smoke", "--b", "pool=0"]))


def test_readme_loop_follows_the_readme_per_family():
    # README, "The target's moving average in your own loop": the run's length always with SGD;
    # with Adam also tau base 0.996, except a ResNet, which keeps the constructor's EMA.
    from benchmarks.common.contenders import readme_loop

    assert readme_loop("sgd", 200, "resnet10t") == {"moving_average_total_steps": 200}
    assert readme_loop("sgd", 300, "regnetx_002") == {"moving_average_total_steps": 300}
    assert readme_loop("adam", 705, "resnet10t") == {}
    assert readme_loop("adam", 705, "seresnet50") == {}
    for other in ("regnetx_002", "mobilenetv3_small_100", "convnext_atto", "vit_tiny_patch16_224"):
        assert readme_loop("adam", 200, other) == {"moving_average_total_steps": 200, "moving_average_decay": 0.996}
