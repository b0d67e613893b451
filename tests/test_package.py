"""The package's shape: layering, import circles, function length, public surface, moved paths.

Every ``import`` statement of every module is read from the source (module level and
inside functions alike, since a lazy import is still a dependency), resolved to a
module of the package, and checked against the layers of docs/DESIGN.md: the method
(the flat modules at the top) imports neither the data layer (``byol_pytorch.data``) nor
the training runtime (``byol_pytorch.training``) nor the application (``byol_pytorch.app``);
the data layer imports neither the runtime nor the application; nothing below the
application imports it; and no import circle exists. Functions fit on a screen (at
most 80 lines without their docstring), every module declares ``__all__``, and every
docstring example runs and prints what it shows.
"""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "byol_pytorch"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports (``from . import x`` resolved to ``pkg.x``)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module -> the module
                target = target.rpartition(".")[0]
            if target and target != name and not _is_parent_package(target, name):
                found.add(target)
    return found


def _is_parent_package(target: str, name: str) -> bool:
    """``byol_pytorch`` or ``byol_pytorch.app`` imported implicitly as parents of ``name``."""
    return name.startswith(target + ".")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _is_app(name: str) -> bool:
    return name == "byol_pytorch.app" or name.startswith("byol_pytorch.app.")


def _layer(name: str) -> str:
    """``app``, ``training``, ``data`` or ``method`` (the flat modules), by the module's folder."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in ("app", "training", "data"):
        return parts[1]
    return "entry" if name in ("byol_pytorch", "byol_pytorch.__main__", "byol_pytorch._compat") else "method"


# what each layer may import (besides itself): the rule of docs/DESIGN.md
ALLOWED = {
    "method": {"method"},
    "data": {"data", "method"},
    "training": {"training", "data", "method"},
    "app": {"app", "training", "data", "method"},
}


def test_the_graph_is_read():
    """A guard for the checks below: the reader sees the package's known edges."""
    graph = _graph()
    assert "byol_pytorch.encoder" in graph["byol_pytorch.byol"]
    assert "byol_pytorch.training.engine" in graph["byol_pytorch.app.train"]
    assert "byol_pytorch.data.folder" in graph["byol_pytorch.data.shards"]
    assert "byol_pytorch.app.errors" in graph["byol_pytorch.app.cli"]
    assert "byol_pytorch.app.train" in graph["byol_pytorch.app.cli"]  # a lazy import, inside a function


def test_the_layers_import_only_downwards():
    offenders = {
        name: sorted(
            dep for dep in deps if _layer(dep) not in ALLOWED[_layer(name)] | {"entry"} or dep == "byol_pytorch"
        )
        for name, deps in _graph().items()
        if _layer(name) in ALLOWED
    }
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_the_layer_rule_catches_a_data_module_importing_the_runtime():
    assert _layer("byol_pytorch.data.sources") == "data" and _layer("byol_pytorch.byol") == "method"
    assert "training" not in ALLOWED["data"] and "data" not in ALLOWED["method"] and "app" not in ALLOWED["training"]


def test_the_method_layer_is_the_flat_top():
    """The folders show the design: the method's modules at the top, data and runtime in their own folders."""
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    assert {"byol", "encoder", "heads", "losses", "ema", "augment", "collapse"} <= flat
    assert not flat & {"data", "shards", "hf_data", "cifar", "sampling", "file_index", "engine", "optim", "checkpoint"}
    assert {p.stem for p in (PACKAGE / "data").glob("*.py")} >= {"folder", "file_index", "shards", "hf", "cifar"}
    assert {p.stem for p in (PACKAGE / "training").glob("*.py")} >= {"engine", "optim", "checkpoint", "recipe"}


def test_the_core_never_imports_the_application():
    graph = _graph()
    offenders = {name: sorted(filter(_is_app, deps)) for name, deps in graph.items() if not _is_app(name)}
    offenders = {name: deps for name, deps in offenders.items() if deps and name != "byol_pytorch.__main__"}
    assert offenders == {}, f"core modules importing the application: {offenders}"


def test_the_errors_module_imports_nothing_of_ours():
    assert _graph()["byol_pytorch.app.errors"] == set()


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    assert _find_cycle(_graph()) is None


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_the_cycle_finder_finds_a_circle(graph, expected):
    assert _find_cycle(graph) == expected


MAX_FUNCTION_LINES = 80


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function in ``path``, its docstring not counted."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
            first = body[1].lineno if has_doc and len(body) > 1 else body[0].lineno
            found.append((node.name, (node.end_lineno or first) - first + 1))
    return found


def test_no_function_is_longer_than_a_screen():
    long = {
        f"{name}:{function}": lines
        for name, path in _modules().items()
        for function, lines in _function_lengths(path)
        if lines > MAX_FUNCTION_LINES
    }
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines (docstring excluded): {long}"


def test_the_length_counter_skips_the_docstring(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        'def f():\n    """Doc.\n\n    More.\n    """\n    a = 1\n    return a\n\n\ndef g():\n    return 2\n'
    )
    assert _function_lengths(source) == [("f", 2), ("g", 1)]


def test_every_module_declares_its_public_names():
    exempt = {"byol_pytorch.__main__", "byol_pytorch.app"}  # an entry point; a package with no names
    missing = [
        name
        for name, path in _modules().items()
        if name not in exempt and "__all__" not in path.read_text(encoding="utf-8")
    ]
    assert missing == []


def test_no_complexity_waivers():
    waived = [name for name, path in _modules().items() if "noqa: C901" in path.read_text(encoding="utf-8")]
    assert waived == []


# Module paths of 1.1.0 (its byol_pytorch/*.py) and a name each exported.
RELEASED_1_1_0 = {
    "checkpoint": ["save_checkpoint", "load_checkpoint", "export_backbone", "atomic_write", "FORMAT"],
    "cli": ["main", "build_parser", "UserError"],
    "data": ["ImageFolder", "LabelledImageFolder", "load_image", "collate_images", "make_loader", "IMAGE_EXTENSIONS"],
    "demo": ["run_demo", "add_demo_arguments"],
    "evaluate": ["extract_features", "knn_accuracy", "linear_probe", "collapse_report"],
    "fashion_mnist": ["load_fashion_mnist"],
    "loop": ["EpochSampler", "DistContext", "setup_distributed", "OptimizerStep", "step_batches", "match_channels"],
    "models": ["build_backbone", "build_learner", "strip_classifier", "TORCHVISION_PREFIX"],
    "monitor": ["MetricsLog", "KnnMonitor", "split_labelled", "plot_curves_or_warn"],
    "optim": ["LARS", "build_optimizer", "lr_help", "warmup_cosine_scheduler"],
    "plots": ["plot_curves", "plot_views"],
    "train": ["get_args_parser", "main", "train"],
    "trainer": ["BYOLTrainer", "MockDataset"],
    "encoder": ["BackboneEncoder", "pool_hidden", "probe_backbone"],
    "augment": ["BYOLAugment"],
    "byol": ["BYOL"],
    "ema": ["ema_update_", "cosine_tau"],
    "heads": ["byol_mlp"],
    "losses": ["byol_loss"],
}


@pytest.mark.parametrize("module", sorted(RELEASED_1_1_0))
def test_every_1_1_0_module_path_still_imports(module):
    """Moved paths work for one release, with a DeprecationWarning naming the new place; the rest as before."""
    import importlib
    import sys
    import warnings

    name = f"byol_pytorch.{module}"
    sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imported = importlib.import_module(name)
    moved = (PACKAGE / f"{module}.py").exists() is False and not (PACKAGE / module).is_dir()
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning) and name in str(w.message)]
    assert bool(deprecations) == moved, [str(w.message) for w in caught]
    if moved:
        assert "1.3.0" in str(deprecations[0].message)
        assert deprecations[0].filename == __file__  # attributed to the importing line, not to importlib
    for attribute in RELEASED_1_1_0[module]:
        assert getattr(imported, attribute) is not None, f"{name}.{attribute}"


def test_a_moved_path_is_the_new_module_itself():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from byol_pytorch import cli as old_cli  # noqa: F401
        from byol_pytorch.checkpoint import export_backbone
    from byol_pytorch.app import cli as new_cli
    from byol_pytorch.training.models import export_backbone as new_export

    assert old_cli is new_cli and export_backbone is new_export


def test_the_remote_extra_holds_every_narrower_one():
    """README: ``[remote]`` reads http(s)://, s3:// and gs:// (before: it had no gcsfs, so gs:// needed ``[gcs]``)."""
    tree = ast.parse((PACKAGE.parent / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    assert set(extras["http"]) | set(extras["s3"]) | set(extras["gcs"]) <= set(extras["remote"])


def _setup_keyword(name: str):
    tree = ast.parse((PACKAGE.parent / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == name))


def test_what_the_package_imports_when_loaded_is_declared():
    """A probe: numpy was imported by ``import byol_pytorch`` but not required (torchvision happened to bring it).
    Module-level imports of other packages must be in install_requires (imports inside functions are optional)."""
    import sys

    distribution = {"PIL": "pillow"}  # import name -> distribution name, where they differ
    required = {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in _setup_keyword("install_requires")}
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "byol_pytorch"}
    assert {"torch", "numpy", "PIL"} <= third_party  # the scan sees what it must
    assert {distribution.get(name, name).lower() for name in third_party} <= required


def test_the_sdist_carries_the_whole_test_suite(tmp_path):
    """A probe: the sdist held 16 of tests/' 56 .py files (setuptools' default tests/test*.py), so its suite failed
    to collect ('No module named conftest'); MANIFEST.in grafts tests/ and what they read."""
    import subprocess
    import sys
    import tarfile

    repo = PACKAGE.parent
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=repo,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {
        str(path.relative_to(repo))
        for folder in ("tests", "benchmarks", "examples")
        for path in (repo / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert wanted and wanted <= names, sorted(wanted - names)[:5]
    assert {"LICENSE", "README.md", "BENCHMARKS.md", "MANIFEST.in", ".ci/run"} <= names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_importing_the_package_leaves_the_compiler_unloaded_until_a_learner_is_made():
    """A probe: `@torch.compiler.disable` on a method imported torch._dynamo with the package, about 2 s of every
    `byol-pytorch` command (`--help` too). The copy of the target stays outside compiled graphs: the decorator is
    applied when the first learner is made, or unpickled in a process that made none."""
    import subprocess
    import sys

    script = (
        "import io, pickle, sys, torch, torch.nn as nn\n"
        "import byol_pytorch\n"
        "from byol_pytorch import BYOL\n"
        "print('torch._dynamo' in sys.modules, getattr(BYOL.init_target, '_torchdynamo_disable', False))\n"
        "if sys.argv[1] == 'make':\n"
        "    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
        "    learner = BYOL(net, 16, hidden_layer=-1, projection_hidden_size=16)\n"
        "    print(pickle.dumps(learner).hex())\n"
        "else:\n"
        "    pickle.loads(bytes.fromhex(sys.stdin.read()))\n"
        "    print(getattr(BYOL.init_target, '_torchdynamo_disable', False))\n"
    )
    made = subprocess.run([sys.executable, "-c", script, "make"], capture_output=True, text=True, check=True)
    first, pickled = made.stdout.splitlines()
    assert first == "False False"
    loaded = subprocess.run(
        [sys.executable, "-c", script, "load"], input=pickled, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.split() == ["False", "False", "True"]


def _docstring_examples(module) -> doctest.TestResults:
    """Runs the ``Examples:`` of ``module``'s docstrings; ``...`` stands for any text."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS, verbose=False)
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=lambda text: None)
    return runner.summarize(verbose=False)


_WITH_EXAMPLES = [name for name, path in _modules().items() if ">>> " in path.read_text(encoding="utf-8")]


@pytest.mark.parametrize("name", _WITH_EXAMPLES)
def test_every_docstring_example_gives_what_it_shows(name):
    """The docstrings' examples are documentation users copy: each one runs and prints what it says."""
    results = _docstring_examples(importlib.import_module(name))
    assert results.attempted > 0 and results.failed == 0, f"{results.failed} example(s) of {name} do not hold"


def test_a_wrong_docstring_example_is_caught(tmp_path, monkeypatch):
    (tmp_path / "shown.py").write_text('def two():\n    """\n    >>> two()\n    3\n    """\n    return 2\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    results = _docstring_examples(importlib.import_module("shown"))
    assert (results.attempted, results.failed) == (1, 1)
