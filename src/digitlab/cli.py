"""The `digitlab` command: each subcommand parses its flags and calls the library API.

Errors a user can cause arrive as DigitlabError and leave as one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from digitlab.errors import DigitlabError

Handler = Callable[[argparse.Namespace], int]

SOURCE_HELP = (
    "data source: mnist, mnist:train, mnist:test, idx:DIR, idx:DIR:test, kaggle:PATH (train.csv or "
    "test.csv), images:DIR (class sub-folders 0/..9/)"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------- data


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect, plot, convert and download data sources")
    data_sub = data.add_subparsers(dest="data_cmd", required=True, metavar="{info,show,export,download}")

    info = data_sub.add_parser("info", help="counts, class histogram, pixel mean/std, fingerprint")
    info.add_argument("source", nargs="?", default="mnist", help=SOURCE_HELP + " (default: mnist)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_run_data_info)

    show = data_sub.add_parser("show", help="save a grid of sample digits with their labels as PNG")
    show.add_argument("source", nargs="?", default="mnist", help=SOURCE_HELP + " (default: mnist)")
    show.add_argument("--n", type=_positive_int, default=10, help="how many digits (default: 10)")
    show.add_argument("--seed", type=int, default=None, help="pick random digits with this seed "
                      "(default: the first N)")
    show.add_argument("--out", required=True, type=Path, help="PNG file to write")
    show.set_defaults(handler=_run_data_show)

    export = data_sub.add_parser("export", help="write a source in Kaggle CSV or IDX format")
    export.add_argument("source", help=SOURCE_HELP)
    export.add_argument("--format", required=True, choices=["kaggle", "idx"],
                        help="kaggle: one CSV file (label column when the source has labels); "
                        "idx: a folder with the official file pair")
    export.add_argument("--out", required=True, type=Path,
                        help="CSV file (kaggle) or directory (idx) to write")
    export.add_argument("--split", choices=["train", "test"], default="train",
                        help="idx only: name the files as the train or t10k pair (default: train)")
    export.add_argument("--no-labels", action="store_true",
                        help="kaggle only: write test.csv form (pixels only) even if labelled")
    export.set_defaults(handler=_run_data_export)

    download = data_sub.add_parser("download", help="fetch the four official MNIST files, "
                                   "verified against pinned sha256 sums")
    download.add_argument("--dir", type=Path, default=None,
                          help="where to put them (default: the digitlab cache, $DIGITLAB_HOME/idx)")
    download.add_argument("--mirror", action="append", default=None, metavar="URL",
                          help="base URL to try before the built-in mirrors (repeatable)")
    download.set_defaults(handler=_run_data_download)


def _run_data_info(args: argparse.Namespace) -> int:
    from digitlab.data import load_source
    from digitlab.data.summary import describe

    info = describe(load_source(args.source))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"source       {info['source']}")
    print(f"images       {info['count']:,} x 28x28 uint8")
    print(f"labels       {'yes' if info['class_counts'] else 'no'}")
    print(f"pixel mean   {info['pixel_mean']:.4f}  (0..1 scale)")
    print(f"pixel std    {info['pixel_std']:.4f}")
    print(f"fingerprint  {info['fingerprint']}")
    if info["class_counts"]:
        print("class counts")
        total = info["count"]
        for digit, n in enumerate(info["class_counts"]):
            print(f"  {digit}  {n:6d}  {100 * n / total:5.2f}%")
    return 0


def _run_data_show(args: argparse.Namespace) -> int:
    from digitlab.data import load_source
    from digitlab.report import save_sample_grid

    out = save_sample_grid(load_source(args.source), args.out, n=args.n, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _run_data_export(args: argparse.Namespace) -> int:
    from digitlab.data import load_source, write_idx_dir, write_kaggle_csv

    data = load_source(args.source)
    if args.format == "kaggle":
        written = [write_kaggle_csv(args.out, data, with_labels=False if args.no_labels else None)]
    else:
        written = write_idx_dir(args.out, data, split=args.split)
    for path in written:
        print(f"wrote {path}")
    return 0


def _run_data_download(args: argparse.Namespace) -> int:
    from digitlab.data.download import download_mnist
    from digitlab.data.offline import cache_dir

    target = args.dir or cache_dir() / "idx"
    folder = download_mnist(target, mirrors=args.mirror, progress=print)
    print(f"MNIST IDX files verified in {folder}")
    return 0


# ---------------------------------------------------------------- main

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_data]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digitlab",
        description="Train, evaluate, explain and serve CNNs for handwritten digits.",
        epilog="Run `digitlab COMMAND --help` for the flags of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log library details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except DigitlabError as exc:
        print(f"digitlab: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `digitlab ... | head` is not an error
        return 0
