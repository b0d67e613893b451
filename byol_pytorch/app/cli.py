"""The ``byol-pytorch`` command (also ``python -m byol_pytorch``): train, export, eval, embed, preview, demo.

Usage::

    byol-pytorch train --data DIR [--model resnet50] [--image-size 224] [--batch-size 256]
                       [--epochs 100 | --max-steps N] [--out RUNDIR] [--resume [CHECKPOINT]] ...
    torchrun --nproc_per_node=N -m byol_pytorch train --data DIR ...
    byol-pytorch export RUNDIR/last.pt --out backbone.safetensors
    byol-pytorch eval --data LABELLED_DIR --checkpoint RUNDIR/last.pt [--knn] [--linear]
    byol-pytorch embed --data DIR --checkpoint RUNDIR/last.pt --out EMBEDDINGS_DIR
    byol-pytorch preview --data DIR --out views.png
    byol-pytorch shards make --data DIR --out SHARD_DIR [--shard-size 1GB]
    byol-pytorch shards index 'SHARD_DIR/train-{000000..000009}.tar' --out index.json
    byol-pytorch demo

Bad input (a missing folder, an unknown model, a file that is not our checkpoint...) and
a failing environment (a full disk, a read-only file system, permissions, a dead peer
process under torchrun) print one line, ``byol-pytorch: error: ...``, and exit with
status 1 (2 for a command line argparse cannot parse); never a traceback, unless
``--debug`` or ``BYOL_PYTORCH_DEBUG=1`` asks for it. A run stopped by SIGTERM/SIGINT saves
its checkpoint and exits with 128 + the signal number (143, 130), so that job
schedulers see it did not finish.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from .._modules import inside_folder
from .errors import (
    PROG,
    UserError,
    before_the_group,
    debug_enabled,
    describe_os_error,
    is_out_of_memory,
    last_line,
    launched_processes,
    one_line,
    prints_node_errors,
    warn,
)
from .recipe import check_seed

__all__ = ["UserError", "main", "build_parser"]

PREVIEW_MOST = 64  # images in one preview: the figure's layout time grows faster than the count (160: 69 s)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (usage stays in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        if prints_node_errors():  # under torchrun every process parses the same flags: one line per node
            sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """argparse's, with an unknown flag named by the command it was given to, and the closest flag it has."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._chosen(parsed)
            flags = [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
            close = [
                difflib.get_close_matches(extra.split("=")[0], flags, n=1) for extra in extras if extra[:2] == "--"
            ]
            hints = sorted({match[0] for match in close if match})
            meant = f" (did you mean {' or '.join(hints)}?)" if hints else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{meant}")
        return parsed

    def _chosen(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the sub-command ``parsed`` ran (``train``, ``shards make``), else this one."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                name = getattr(parsed, action.dest, None)
                chosen = action.choices.get(name) if name else None
                if isinstance(chosen, _Parser):
                    return chosen._chosen(parsed)
        return self


def _run_train(args: argparse.Namespace) -> int:
    from .train import main as train_main

    summary = train_main(args)
    return int(summary.get("exit_code", 0))


def _run_export(args: argparse.Namespace) -> int:
    from ..training.models import TORCH_SUFFIXES, export_backbone

    _refuse_folder_out(args.out, "backbone.safetensors")
    if not os.path.isdir(args.out) and Path(args.out).suffix.lower() not in (".safetensors", *TORCH_SUFFIXES):
        raise UserError(
            f"--out {args.out}: name a .safetensors file (or {', '.join(TORCH_SUFFIXES)} for a torch.save state "
            "dict), e.g. backbone.safetensors"
        )
    metadata: dict[str, str] = {}  # what the safetensors metadata holds, for a .pt file too
    try:
        path = export_backbone(args.checkpoint, args.out, which=args.which, bn_stats=args.bn_stats, details=metadata)
    except OSError as error:
        if error.errno is None:  # a checkpoint that is not there: load_checkpoint's own message
            raise UserError(str(error)) from None
        raise UserError(f"--out: {describe_os_error(error)}") from None  # the write (atomic: nothing half-written)
    except ValueError as error:
        raise UserError(str(error)) from error
    held = metadata.get("bn_stats", "?")
    statistics = "no BatchNorm; " if held == "none" else f"BatchNorm statistics {held}; "
    into = metadata.get("load") or "the backbone without its classifier"
    print(f"byol-pytorch: wrote {path} ({statistics}load it with strict=True into {into})")
    return 0


def _refuse_folder_out(out: str, example: str) -> None:
    """A ``--out`` ending in a path separator names a folder: a file was wanted (writing one beside it misleads)."""
    if out.endswith(("/", os.sep)):
        raise UserError(f"--out {out} names a folder; name the file to write in it, e.g. {out}{example}")


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..data import sample_images
    from ..data.folder import NoReadableImagesError
    from ..training.evaluate import collapse_report, knn_accuracy, linear_probe
    from ..training.models import learner_from_checkpoint
    from ..training.validation import KnnMonitor
    from .devices import resolve_device
    from .train import CLEAN_IMAGES

    if args.batch_size < 1 or args.workers < 0:
        raise UserError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    try:
        device = resolve_device(args.device)
        learner, checkpoint, statistics = learner_from_checkpoint(args.checkpoint, device, args.which, args.bn_stats)
        recipe = checkpoint["args"]
    except (FileNotFoundError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"--checkpoint: {error}") from error
    channels = 1 if learner.channels == 1 else 3
    try:
        options = {"split": args.hf_split, "image_column": args.image_column, "label_column": args.label_column}
        data = KnnMonitor(
            args.data, int(recipe["image_size"]), channels, device, args.batch_size, args.workers, data_options=options
        )
        if statistics == "missing":  # an older checkpoint: re-estimated on the images evaluated
            data.clean_images = sample_images(data.bank, CLEAN_IMAGES)
            statistics = f"clean (re-estimated on {len(data.clean_images)} of these images)"
        bank, bank_labels, queries, query_labels = data.features(learner)
    except (ValueError, NoReadableImagesError) as error:
        raise UserError(f"--data: {error}") from None
    for line in (data.missing_warning(args.data), data.held_out_warning()):
        if line:
            warn(line)
    print(
        f"byol-pytorch eval: {args.checkpoint} (step {checkpoint.get('step')}, {recipe['model']}, {args.which} "
        f"network, BatchNorm statistics {statistics}), "
        f"{len(bank)} labelled images to fit, {len(queries)} held out, {data.classes_present} classes"
        + (f" ({data.unreadable} unreadable images left out)" if data.unreadable else "")
    )
    if args.knn or not args.linear:
        accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, data.num_classes)
        k = min(20, len(bank))  # knn_predict clips k to the bank
        print(f"kNN accuracy (k={k}{'' if k == 20 else ', every labelled image'}, T=0.07): {accuracy:.4f}")
    if args.linear or not args.knn:
        accuracy = linear_probe(bank, bank_labels, queries, query_labels, data.num_classes)
        print(f"linear probe accuracy: {accuracy:.4f}")
    features = torch.cat([bank, queries])
    report = collapse_report(features, warn=False)
    ceiling = min(len(features), report["dim"])  # a rank is at most the number of images
    most = f"{report['dim']}" + (f" (at most {ceiling} for {len(features)} images)" if ceiling < report["dim"] else "")
    verdict = (
        "COLLAPSED: the images map to nearly one vector; lower --lr, lengthen the warm-up, or raise --tau-base"
        if report["collapsed"]
        else "not collapsed"
    )
    print(
        f"collapse report: std {report['std']:.4g} (1/sqrt(D) = {report['dim'] ** -0.5:.4g}), "
        f"effective rank {report['effective_rank']:.2f} of {most}: {verdict}"
    )
    return 0


def _run_preview(args: argparse.Namespace) -> int:
    import torch

    from ..augment import BYOLAugment
    from ..data import load_size_for, open_unlabelled, readable_images
    from ..data.remote import redact

    if args.image_size < 8 or not 1 <= args.count <= PREVIEW_MOST:
        raise UserError(
            f"--image-size must be >= 8 and --count between 1 and {PREVIEW_MOST}, got {args.image_size} and "
            f"{args.count}"
        )
    _refuse_folder_out(args.out, "views.png")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; name the picture to write in it, e.g. {args.out}/views.png")
    if os.path.isdir(os.path.expanduser(args.data)) and inside_folder(args.out, args.data):  # a probe: it wrote over
        raise UserError(  # one of the images, and a new picture there is read as one from then on
            f"--out {args.out} is inside --data {args.data}: the picture would become one of its images (or write "
            "over one); write it elsewhere, e.g. --out views.png"
        )
    check_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    try:
        dataset = open_unlabelled(
            args.data, load_size_for(args.image_size), 3, split=args.hf_split, image_column=args.image_column
        )
        originals, unreadable = readable_images(  # (N, 3, S, S) uint8
            dataset, args.count, order=lambda n: torch.randperm(n, generator=generator)
        )
        if not len(originals):
            raise ValueError(f"no readable image in {redact(args.data)} ({unreadable} unreadable)")
    except ImportError as error:
        raise UserError(f"--data {args.data}: {error}") from None
    except (ValueError, RuntimeError) as error:
        raise UserError(f"--data: {error}") from None
    view_one = BYOLAugment(args.image_size, view=1, preset=args.views)
    view_two = BYOLAugment(args.image_size, view=2, preset=args.views)
    torch.manual_seed(args.seed)
    mean, std = view_one.resolve_mean_std(3)
    try:
        from .plots import plot_views

        written = plot_views(
            originals, view_one(originals), view_two(originals), args.out, mean, std, max_images=len(originals)
        )
    except ImportError as error:
        hint = "pip install matplotlib" if "matplotlib" in str(error) else "the plots module is missing"
        raise UserError(f"preview cannot draw ({error}): {hint}") from None
    except OSError as error:
        raise UserError(f"--out: {describe_os_error(error)}") from None
    except ValueError as error:
        raise UserError(f"--out: {error}") from None
    left_out = f" ({unreadable} unreadable images passed over)" if unreadable else ""
    print(
        f"byol-pytorch: wrote {written}: {len(originals)} images from {redact(args.data)}{left_out}, each beside "
        "view 1 and view 2"
    )
    print(f"  {view_one.describe()}\n  {view_two.describe()}")
    return 0


def _run_embed(args: argparse.Namespace) -> int:
    from .embed import run_embed

    return run_embed(args)


def _run_shards(args: argparse.Namespace) -> int:
    from .shards_cmd import run_shards

    return run_shards(args)


def _run_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import run_demo
    except ImportError as error:
        raise UserError(f"the demo is not available in this installation ({error})") from None
    try:
        result = run_demo(args)
    except FloatingPointError as error:
        raise UserError(str(error)) from None
    return result if isinstance(result, int) else 0


def _add_demo(sub) -> None:
    help_text = "pretrain a small backbone on Fashion-MNIST and show kNN accuracy before and after"
    parser = sub.add_parser("demo", help=help_text, description=help_text)
    try:
        from .demo import add_demo_arguments
    except ImportError:
        return  # reported when the command runs
    add_demo_arguments(parser)


def _add_bn_stats(parser: argparse.ArgumentParser, data: bool = True) -> None:
    older = (
        "re-estimated on the data for an older checkpoint"
        if data
        else "an older checkpoint without them gives the trained ones, with a warning"
    )
    parser.add_argument(
        "--bn-stats",
        choices=["clean", "trained"],
        default="clean",
        help="BatchNorm statistics: clean = re-estimated on un-augmented training images (saved in the checkpoint "
        f"by train; {older}), trained = those of the augmented views (default: %(default)s)",
    )


def _add_preview(sub) -> None:
    preview = sub.add_parser(
        "preview",
        help="save originals beside their two augmented views",
        description="Save a picture of images from DIR beside BYOL's view 1 and view 2.",
    )
    preview.add_argument("--data", required=True, help="the images: a folder, cifar10:ROOT, hf:PATH or tar shards")
    preview.add_argument(
        "--hf-split", help="hf: data with splits: the split (default: train, or the only split); CIFAR: train or test"
    )
    preview.add_argument("--image-column", help="hf: data with several image columns: the one to show")
    preview.add_argument("--out", default="views.png", help="the PNG to write (default: %(default)s)")
    preview.add_argument("--image-size", type=int, default=224, help="view side (default: %(default)s)")
    preview.add_argument(
        "--count", type=int, default=8, help=f"images shown, at most {PREVIEW_MOST} (default: %(default)s)"
    )
    preview.add_argument("--seed", type=int, default=0, help="seed of the views (default: %(default)s)")
    preview.add_argument(
        "--views",
        choices=["auto", "paper"],
        default="auto",
        help="auto: fitted to --image-size (as train makes them); paper: Table 6 at any size (default: %(default)s)",
    )


def _add_eval(sub: Any) -> None:
    """The ``eval`` command's arguments."""
    evaluate = sub.add_parser(
        "eval",
        help="kNN / linear-probe accuracy of a checkpoint on labelled images",
        description="Accuracy of a checkpoint's frozen features on LABELLED_DIR "
        "(one sub-folder per class; ROOT/train + ROOT/val are used as given, "
        "else every fifth image of each class is held out), and a collapse report.",
    )
    evaluate.add_argument(
        "--data",
        required=True,
        help="labelled folder: one sub-folder per class; or cifar10:ROOT / cifar100:ROOT (train batches -> test "
        "batch); or hf:PATH with a label column; or tar shards of byol-pytorch shards make --labels (every fifth "
        "sample in the shards' order held out, not per class, so the figure differs a little from the folder's)",
    )
    evaluate.add_argument("--checkpoint", required=True, help="RUNDIR/last.pt")
    evaluate.add_argument(
        "--hf-split",
        help="hf: data: evaluate within this split, every fifth row of each class held out "
        "(default: train against validation/test where both exist)",
    )
    evaluate.add_argument(
        "--image-column", help="hf: data: the image column (default: the datasets.Image column, else of image bytes)"
    )
    evaluate.add_argument("--label-column", help="hf: data: the label column (default: the one ClassLabel column)")
    evaluate.add_argument("--knn", action="store_true", help="weighted kNN (k=20, T=0.07) accuracy")
    evaluate.add_argument("--linear", action="store_true", help="linear probe accuracy")
    evaluate.add_argument("--batch-size", type=int, default=256, help="images per forward (default: %(default)s)")
    evaluate.add_argument("--workers", type=int, default=0, help="loader processes (default: %(default)s)")
    evaluate.add_argument("--device", help="default: cuda when available, else cpu")
    evaluate.add_argument(
        "--which", choices=["online", "target"], default="online", help="the network to evaluate (default: online)"
    )
    _add_bn_stats(evaluate)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command."""
    from .train import add_train_arguments

    parser = _Parser(prog=PROG, description="BYOL self-supervised pretraining for any image backbone.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    train = sub.add_parser(
        "train",
        help="pretrain a backbone on a folder of images",
        description="BYOL pretraining on a folder of images (torchrun for several GPUs).",
    )
    add_train_arguments(train)

    export = sub.add_parser(
        "export",
        help="write the trained backbone as safetensors",
        description="Write the backbone of a checkpoint, without its classifier, as "
        "safetensors: timm.create_model(NAME, num_classes=0) loads it with strict=True (with the image size, "
        "img_size=S, for models that take one; the closing line gives the exact call, and the file's metadata "
        "holds it as 'load').",
    )
    export.add_argument("checkpoint", help="RUNDIR/last.pt")
    export.add_argument(
        "--out",
        required=True,
        help="the .safetensors file to write (.pt, .pth or .bin: a torch.save state dict, torch.load reads it)",
    )
    export.add_argument(
        "--which",
        choices=["online", "target"],
        default="online",
        help="the online network (default; the paper keeps it) or the EMA target",
    )
    _add_bn_stats(export, data=False)

    _add_eval(sub)

    _add_preview(sub)
    from .embed import add_embed_arguments

    embed = sub.add_parser(
        "embed",
        help="write the representation of every image to disk (embeddings.npy, ids.txt)",
        description="The representation of every image of --data under a checkpoint's backbone, streamed to "
        "OUT/embeddings.npy (memory-mappable), with the sample ids (OUT/ids.txt) and labels where the data has them.",
    )
    add_embed_arguments(embed)

    from .shards_cmd import add_shards_arguments

    shards = sub.add_parser(
        "shards",
        help="write tar shards from a folder of images (make), or the index of shards (index)",
        description="Tar shards in webdataset's layout: shards make packs a folder, shards index counts samples.",
    )
    add_shards_arguments(shards, _Parser)
    _add_demo(sub)
    debug_help = "show the traceback of an error (also BYOL_PYTORCH_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for command in sub.choices.values():  # also after the command: byol-pytorch train ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _run_train,
    "export": _run_export,
    "eval": _run_eval,
    "preview": _run_preview,
    "embed": _run_embed,
    "shards": _run_shards,
    "demo": _run_demo,
}


def _one_process_unless_train(command: str) -> None:
    """Only ``train`` splits its work between torchrun's processes; the others would each do all of it."""
    world = launched_processes()
    if command != "train" and world > 1:
        raise before_the_group(
            UserError(
                f"{command} runs in one process, and WORLD_SIZE={world} is set here (torchrun or another launcher "
                f"started this process): each of the {world} would do the whole job, writing the same files; run "
                f"byol-pytorch {command} without torchrun, or without the variable (env -u WORLD_SIZE byol-pytorch "
                f"{command} ...)"
            )
        )


def _out_of_memory_line(args: argparse.Namespace, error: BaseException) -> str:
    """Out of memory: what ran out, and the command's own flags that ask for less."""
    sizes = [flag for flag in ("--image-size", "--batch-size", "--count") if hasattr(args, flag[2:].replace("-", "_"))]
    said = last_line(error)
    return (
        f"out of memory in {args.command}"
        + (f" ({said})" if said != type(error).__name__ else "")
        + (f"; ask for less: a smaller {' or '.join(sizes)}" if sizes else "")
    )


def _report(error: BaseException, message: str, debug: bool) -> None:
    """The one error line; with debugging, the traceback (and its cause) first."""
    if debug:
        error.__suppress_context__ = False
        traceback.print_exception(error)
    world = launched_processes()
    if world > 1:  # under torchrun: which rank, on a line of its own
        message = f"process {os.environ.get('RANK', '?')} of {world}: {message}"
        sys.stderr.write("\n")
    sys.stderr.write(f"{PROG}: error: {one_line(message)}\n")
    sys.stderr.flush()


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (``| head``); if so, stdout is pointed at
    ``os.devnull``, so the interpreter's last flush raises nothing. False where it cannot be told."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return True
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor (a captured stdout)
        return False


@contextmanager
def _package_warnings_as_lines() -> Iterator[None]:
    """The package's own ``UserWarning``s as one ``byol-pytorch: warning:`` line each, like the command's others
    (another library's warnings are shown as Python shows them)."""
    from PIL import Image

    shown = warnings.showwarning
    package = str(Path(__file__).resolve().parents[1])

    def show(message: Any, category: type[Warning], filename: str, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, UserWarning) and str(filename).startswith(package):
            warn(str(message))
        else:
            shown(message, category, filename, *args, **kwargs)

    with warnings.catch_warnings():  # the command's filters, and showwarning, are put back after it
        # Pillow warns from half its pixel limit on, into the progress bar: an image under the limit is read (one
        # over it is named by the package's own warning, with the fix).
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        warnings.showwarning = show
        yield


@contextmanager
def _quiet_storage_logs(debug: bool) -> Iterator[None]:
    """gcsfs logs a traceback for each of its own failed retries (a probe: 26 of them, and no line of ours within
    300 s): our retries and our one error line say it, so its log shows only with ``--debug``."""
    logger = logging.getLogger("gcsfs")
    level = logger.level
    if not debug:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


_PATH_FLAGS = ("data", "val_data", "out", "checkpoint", "resume", "shard_index", "spec", "data_dir")
"""The flags (argparse dests) that name a file, a folder or a local data spec."""


def _home_expanded(args: argparse.Namespace) -> argparse.Namespace:
    """``~`` and ``~user`` at the start of a path flag expanded, as the shell does for a bare word.

    The shell leaves ``--out=~/run`` and a quoted ``'~/photos/{000..009}.tar'`` alone: without
    this, a folder named ``~`` appeared in the working directory, or ``--data`` did not exist.
    (``hf:~/x`` and ``cifar10:~/x`` are expanded by their readers.)
    """
    for name in _PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``byol-pytorch``; returns the exit status.

    Errors of the user's input or environment become one line on stderr: ``UserError``
    and every ``OSError`` (a full disk, a read-only file system, permissions, a path
    that is a file...), named with the path and the fix. ``--debug`` or
    ``BYOL_PYTORCH_DEBUG=1`` prints the traceback too.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success, 1 for bad input or a failing environment (one line on stderr),
        128 + signal for a run stopped by a signal, 141 (128 + SIGPIPE) with no line when
        stdout's reader closed it (``| head``); argparse's own errors exit 2.
    """
    args = _home_expanded(build_parser().parse_args(list(argv) if argv is not None else None))
    debug = debug_enabled(getattr(args, "debug", False))
    try:
        _one_process_unless_train(args.command)
        if getattr(args, "out", None) == "" and args.command != "train":  # train names its default run folder
            raise UserError("--out is empty; name the file or folder to write")
        with _package_warnings_as_lines(), _sigterm_stops(args.command), _quiet_storage_logs(debug):
            return COMMANDS[args.command](args)
    except _Terminated as stop:
        sys.stderr.write(f"{PROG}: stopped by SIGTERM{_kept(args)}\n")
        return 128 + stop.signum
    except Exception as error:
        if getattr(error, "byol_pytorch_quiet", False) and not debug:
            return 1  # under torchrun another process of the run prints the error line
        if isinstance(error, UserError):
            _report(error, str(error), debug)
            return 1
        if isinstance(error, BrokenPipeError) and _stdout_reader_gone():
            return 141  # 128 + SIGPIPE: `byol-pytorch ... | head` read what it wanted; the work is done
        from ..data.remote import RemoteReadError

        if isinstance(error, RemoteReadError):  # remote data no retry heals, in any command (embed, preview, ...)
            _report(error, f"--data: {last_line(error)}", debug)
            return 1
        if isinstance(error, OSError):
            _report(error, describe_os_error(error), debug)
            return 1
        if is_out_of_memory(error):  # train says its own line; here preview, eval, embed, export, demo
            _report(error, _out_of_memory_line(args, error), debug)
            return 1
        raise
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted{_kept(args)}\n")
        return 130


def _kept(args: argparse.Namespace) -> str:
    """What a command stopped on the way keeps (train: whether its run folder holds a checkpoint to resume)."""
    if args.command == "train" and args.out and not (Path(args.out) / "last.pt").is_file():
        if isinstance(args.resume, str):  # --resume OTHER/last.pt: that file is where this run stands
            return f" before its first checkpoint in {args.out}: --resume {args.resume} again starts where it did"
        return " before its first checkpoint: nothing to resume; the next run starts over"
    return _KEPT.get(args.command, "")


_KEPT = {  # what a command stopped on the way keeps
    "train": " (the checkpoint saved before, last.pt, is kept; --resume continues from it)",
    "embed": " (rows written before are kept; --resume continues once some were)",
}


class _Terminated(BaseException):
    """SIGTERM in a command that does not handle it itself: the work unwinds through its clean-up (as on Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _sigterm_stops(command: str) -> Iterator[None]:
    """SIGTERM (a scheduler's stop, ``kill``) stops ``embed``, ``eval``, ``export`` and ``preview`` as Ctrl-C does:
    files closed, ``embed``'s state saved for ``--resume``, one line, exit 143 (before: killed without a word, the
    rows since the last flush not counted). ``train`` and ``shards`` handle it themselves."""
    if command in ("train", "shards"):
        yield
        return
    import signal

    from .errors import signals_raise

    with signals_raise((signal.SIGTERM,), _Terminated):
        yield
