"""``byol-pytorch shards make`` and ``byol-pytorch shards index``: write tar shards and their index."""

from __future__ import annotations

import argparse
import signal
from typing import Any

from ..data.remote import RemoteReadError, redact
from .errors import UserError, signals_raise, warn

__all__ = ["add_shards_arguments", "run_shards"]


def add_shards_arguments(parser: argparse.ArgumentParser, parser_class: type) -> None:
    """The ``make`` and ``index`` sub-commands of ``byol-pytorch shards``."""
    sub: Any = parser.add_subparsers(dest="shards_command", metavar="{make,index}", parser_class=parser_class)
    sub.required = True
    make = sub.add_parser(
        "make",
        help="pack a folder of images into webdataset tar shards, plus their index",
        description="Pack every readable image of --data (searched recursively) into tar shards OUT/train-000000.tar, "
        "... in webdataset's layout (original encoded bytes; keys from the relative paths; in a shuffled order; broken "
        "files skipped and counted; each shard written atomically), and OUT/index.json with each shard's sample "
        "count. An error or a stop removes what it wrote.",
    )
    make.add_argument("--data", required=True, help="the folder of images")
    make.add_argument("--out", required=True, help="the folder to write the shards to (without .tar files yet)")
    make.add_argument("--shard-size", default="1GB", help="most bytes per shard: 1GB, 500MB, 64MiB (default: 1GB)")
    make.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar (default: %(default)s)")
    make.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the order of the samples, shuffled so that each shard mixes the folder's classes (default: 0)",
    )
    make.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep the sorted order of the paths (each class then sits in one run of samples)",
    )
    make.add_argument(
        "--labels",
        action="store_true",
        help="a folder of class sub-folders: write each image's class index (.cls) and OUT/classes.json",
    )
    index = sub.add_parser(
        "index",
        help="count the samples of shards and write their index (webdataset's wids JSON)",
        description="Count the samples of each shard of SPEC (local: from the tar headers; remote: by reading each "
        "once) and write {'wids_version': 1, 'shardlist': [{'url': ..., 'nsamples': ...}]} to --out; "
        "train --shard-index INDEX then reads no shard at start-up.",
    )
    index.add_argument("spec", help="the shards: 'DIR/train-{000000..000099}.tar', a folder of .tar, or a URL pattern")
    index.add_argument("--out", required=True, help="the index file to write (e.g. index.json)")
    for command in (make, index):
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _stopped(signum: int) -> SystemExit:
    """SIGTERM in ``shards make``: the writer's clean-up runs on the way out (exit 143, as ``train``)."""
    warn("stopped by SIGTERM: the shards it had written are removed; run it again (into the same --out)")
    return SystemExit(128 + signum)


def run_shards(args: argparse.Namespace) -> int:
    """Run ``shards make`` or ``shards index``."""
    from ..data.shard_writer import make_shards, parse_size, write_index

    try:
        if args.shards_command == "make":
            with signals_raise((signal.SIGTERM,), _stopped):  # the shard being written is removed, as on Ctrl-C
                made = make_shards(
                    args.data,
                    args.out,
                    parse_size(args.shard_size),
                    args.prefix,
                    labels=args.labels,
                    shuffle=not args.no_shuffle,
                    seed=args.seed,
                )
            if made.unlabelled:
                warn(
                    f"{made.unlabelled} images under {args.data} lie outside its class sub-folders and were left out "
                    "(--labels writes the images of class sub-folders only)"
                )
            if made.broken:
                shown = ", ".join(made.broken[:3]) + (", ..." if len(made.broken) > 3 else "")
                warn(f"{len(made.broken)} files under {args.data} do not decode as images and were skipped: {shown}")
            if len(made.shards) > 1 and max(made.counts) == 1:
                warn(
                    f"each of the {len(made.shards)} shards holds a single image: --shard-size {args.shard_size} is "
                    "smaller than two of these images in a tar file (tar rounds a file up to 10240 bytes); give a "
                    "size that holds many (shards of 64MB to 1GB read best)"
                )
            last = len(made.shards) - 1
            pattern = (
                made.shards[0] if last == 0 else made.shards[0].with_name(f"{args.prefix}-{{000000..{last:06d}}}.tar")
            )
            order = "sorted" if args.no_shuffle else "shuffled"
            print(
                f"byol-pytorch: wrote {len(made.shards)} shard{'' if len(made.shards) == 1 else 's'} "
                f"({sum(made.counts)} images, {made.bytes} bytes, in a "
                f"{order} order) to {args.out}, index {made.index}; --data '{pattern}' (or --data {args.out})"
            )
            return 0
        path, counts = write_index(args.spec, args.out)
        print(f"byol-pytorch: wrote {path}: {len(counts)} shards, {sum(counts)} samples in {redact(args.spec)}")
        return 0
    except ImportError as error:
        raise UserError(str(error)) from None
    except (ValueError, RemoteReadError) as error:
        raise UserError(redact(error)) from None
