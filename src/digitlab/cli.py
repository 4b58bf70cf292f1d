"""The `digitlab` command: each subcommand parses its flags and calls the library API.

Errors a user can cause arrive as DigitlabError and leave as one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from digitlab.config import DEVICES, MAX_SEED, OPTIMIZERS, PRECISIONS, SCHEDULES, SPEED_ONLY_FIELDS, TrainConfig
from digitlab.errors import DigitlabError

Handler = Callable[[argparse.Namespace], int]

SOURCE_HELP = (
    "data source: mnist, mnist:train, mnist:test, idx:DIR, idx:DIR:test, kaggle:PATH (train.csv or "
    "test.csv), images:DIR (class sub-folders 0/..9/ of PNG/JPEG files, made MNIST-style as predict does)"
)


def _whole_number(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}" if low else
                                         f"must be 0 or more, got {value}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _count_up_to(high: int) -> Callable[[str], int]:
    """1..high: the figures draw one matplotlib panel per digit, and thousands of panels take minutes."""
    return functools.partial(_whole_number, low=1, high=high)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _seed(text: str) -> int:
    return _whole_number(text, 0, MAX_SEED)


def _add_run_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (or ensemble folder)")


# ---------------------------------------------------------------- data


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect, plot, convert, compare and download data sources")
    data_sub = data.add_subparsers(dest="data_cmd", required=True,
                                   metavar="{info,show,export,download,overlap}")

    info = data_sub.add_parser("info", help="counts, class histogram, pixel mean/std, fingerprint")
    info.add_argument("source", nargs="?", default="mnist", help=SOURCE_HELP + " (default: mnist)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_run_data_info)

    show = data_sub.add_parser("show", help="save a grid of sample digits with their labels as PNG")
    show.add_argument("source", nargs="?", default="mnist", help=SOURCE_HELP + " (default: mnist)")
    show.add_argument("--n", type=_count_up_to(400), default=10, help="how many digits, up to 400 (default: 10)")
    show.add_argument("--seed", type=_seed, default=None, help="pick random digits with this seed "
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
    export.add_argument("--limit", type=_positive_int, default=None,
                        help="write only the first N images (e.g. 42000 for a Kaggle-sized train.csv)")
    export.add_argument("--no-labels", action="store_true",
                        help="kaggle only: write test.csv form (pixels only) even if labelled")
    export.set_defaults(handler=_run_data_export)

    download = data_sub.add_parser(
        "download", help="fetch the four official MNIST files, verified against pinned checksums",
        description="Fetch train-images, train-labels, t10k-images and t10k-labels (IDX, .gz) "
        "from the first mirror that has a valid copy. Files already present and valid are kept; "
        "nothing gets its final name before it is verified.",
        epilog="Mirrors are tried in order: each --mirror, then the comma-separated list in "
        "$DIGITLAB_MNIST_MIRRORS if set, else the built-in ones (ossci-datasets S3, "
        "cvdf-datasets GCS, yann.lecun.com).",
    )
    download.add_argument("--dir", type=Path, default=None,
                          help="folder to put them in (default: $DIGITLAB_HOME/idx, else "
                          "~/.cache/digitlab/idx)")
    download.add_argument("--mirror", action="append", default=None, metavar="URL",
                          help="base URL (http, https, file) or local folder holding the four "
                          ".gz files, tried before the others (repeatable)")
    download.set_defaults(handler=_run_data_download)

    overlap = data_sub.add_parser(
        "overlap", help="count images two sources share (identical pixels) and their label disagreements")
    overlap.add_argument("a", metavar="A", help=SOURCE_HELP)
    overlap.add_argument("b", metavar="B", help="a second source, same forms")
    overlap.add_argument("--json", action="store_true", help="print JSON instead of lines")
    overlap.set_defaults(handler=_run_data_overlap)


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
    import numpy as np

    from digitlab.data import load_source, write_idx_dir, write_kaggle_csv

    data = load_source(args.source)
    if args.limit is not None and args.limit < len(data):
        data = data.subset(np.arange(args.limit), f"{data.source}[:{args.limit}]")
    if args.format == "kaggle":
        if args.out.is_dir():
            raise DigitlabError(f"--out {args.out}: a folder; --format kaggle writes one CSV file "
                                f"(e.g. {args.out / 'train.csv'})")
        args.out.parent.mkdir(parents=True, exist_ok=True)  # as `data show --out` does
        written = [write_kaggle_csv(args.out, data, with_labels=False if args.no_labels else None)]
    else:
        if args.out.exists() and not args.out.is_dir():
            raise DigitlabError(f"--out {args.out}: a file; --format idx writes its files into a folder")
        written = write_idx_dir(args.out, data, split=args.split)
    for path in written:
        print(f"wrote {path}")
    return 0


def _run_data_overlap(args: argparse.Namespace) -> int:
    from digitlab.data import load_source
    from digitlab.overlap import source_overlap

    info = source_overlap(load_source(args.a), load_source(args.b))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['a_in_b']:,} of {info['a_count']:,} images of {info['a']} are also in {info['b']}")
    print(f"{info['b_in_a']:,} of {info['b_count']:,} images of {info['b']} are also in {info['a']}")
    if info["label_disagreements"] is None:
        print("labels not compared (a source has no labels, or nothing is shared)")
    else:
        print(f"{info['label_disagreements']:,} shared images of {info['a']} carry a different label in {info['b']}")
    return 0


def _run_data_download(args: argparse.Namespace) -> int:
    from digitlab.data.download import download_mnist
    from digitlab.data.offline import cache_dir

    target = args.dir or cache_dir() / "idx"
    folder = download_mnist(target, mirrors=args.mirror, progress=print)
    print(f"MNIST IDX files verified in {folder}")
    return 0


# ---------------------------------------------------------------- training


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """The recipe fields that both `train` and `ensemble` let a flag override."""
    parser.add_argument("--data", default=None, help=SOURCE_HELP + " (default: mnist:train)")
    parser.add_argument("--val-split", type=float, default=None,
                        help="fraction of --data held out for validation, stratified (seed2017: 0.2)")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="passes over the training data")
    parser.add_argument("--epoch-fraction", type=float, default=None,
                        help="share of the training data drawn at random for each epoch, in (0, 1] "
                        "(fast: a shorter first epoch)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="images per optimizer step")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="auto picks bf16 where the CPU has native bf16 (AVX512-BF16/AMX) or on GPU")
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="write TensorBoard event files into the run folder (per-batch loss, epoch metrics, "
                        "learning rate, validation mistakes); needs `pip install 'digitlab[tensorboard]'`")
    _add_graphs_flag(parser)


def _add_graphs_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="on a CUDA GPU, capture the training step once as CUDA graphs and replay them: 10-17 "
                        "launches per step instead of 80-370, the same weights, about 3x faster on an H100. Default: "
                        "on wherever they can be used (one CUDA GPU, one process, torch >= 2.11), eager elsewhere; "
                        "--cuda-graphs where they cannot be used says why, --no-cuda-graphs trains eagerly. With train "
                        "--resume it changes a run's setting; an ensemble or kaggle rerun given either flag applies "
                        "it to the members it resumes")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from digitlab.presets import DEFAULT_PRESET, list_presets

    train = sub.add_parser(
        "train",
        help="train a model (default: the quick preset on built-in MNIST)",
        description="Train a preset into a run folder (config.json, metrics.jsonl, model.safetensors + "
        "model.json, checkpoint.safetensors). Flags override single fields of the preset. Ctrl-C saves "
        "the state and prints the command that resumes it.",
    )
    train.add_argument("--preset", default=None,
                       help=f"training recipe: {', '.join(list_presets())} (default: {DEFAULT_PRESET})")
    train.add_argument("--config", type=Path, default=None, metavar="JSON",
                       help="start from the config of a run's config.json instead of a preset")
    _add_recipe_flags(train)
    train.add_argument("--val-data", default=None, help="a separate labelled source to validate on, "
                       "instead of a split of --data")
    train.add_argument("--lr", type=float, default=None, help="(peak) learning rate")
    train.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                       help="optimizer (sgd uses Nesterov momentum)")
    train.add_argument("--schedule", default=None, choices=SCHEDULES,
                       help="learning-rate schedule")
    train.add_argument("--label-smoothing", type=float, default=None, help="label smoothing in [0, 1)")
    train.add_argument("--seed", type=_seed, default=None, help="seed for init, split, shuffling and "
                       "augmentation (default: 0)")
    train.add_argument("--device", default=None, choices=DEVICES,
                       help="where to train (default: auto)")
    train.add_argument("--out", type=Path, default=None, help="run folder (default: runs/PRESET-TIMESTAMP)")
    train.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                       help="continue an interrupted run from its last saved state")
    train.add_argument("--quiet", action="store_true", help="print only the last epoch's line")
    train.set_defaults(handler=_run_train)


def _recipe_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The flags of this subcommand that name a TrainConfig field (`--preset` picks, not overrides)."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "preset" and hasattr(args, f.name)}


def _with_flags(base: TrainConfig, overrides: dict[str, object]) -> TrainConfig:
    """`base` with the flags' values, validated; a value that the recipe refuses is named by its flag
    ("--lr: learning rate must be ...") rather than by the preset that it overrides."""
    config = base.with_overrides(**overrides)
    try:
        return config.validate()
    except DigitlabError:
        for name, value in overrides.items():
            if value is None:
                continue
            try:
                base.with_overrides(**{name: value}).validate()
            except DigitlabError as exc:
                reason = str(exc).removeprefix(f"{base.preset}: ")
                raise DigitlabError(f"--{name.replace('_', '-')}: {reason}") from None
        raise


def _base_config(preset: str | None, config_file: Path | None):
    from digitlab.presets import DEFAULT_PRESET, get_preset

    if config_file is None:
        return get_preset(preset or DEFAULT_PRESET)
    if preset:
        raise DigitlabError("give either --preset or --config, not both")
    try:
        return TrainConfig.from_dict(json.loads(config_file.read_text())["config"]).validate()
    except FileNotFoundError:
        raise DigitlabError(f"{config_file}: no such file") from None
    except DigitlabError as exc:
        raise DigitlabError(f"{config_file}: {exc}") from None
    except (ValueError, KeyError, TypeError, OSError, RecursionError) as exc:  # bad JSON, not UTF-8, nested 10^5 deep
        raise DigitlabError(f"{config_file}: not a digitlab config ({exc.__class__.__name__}: {exc})") from None


def _run_train(args: argparse.Namespace) -> int:
    from digitlab.progress import TrainingProgress
    from digitlab.train import TrainingInterrupted, fit

    overrides = _recipe_overrides(args)
    if args.resume is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in overrides.items()
                 if v is not None and k not in SPEED_ONLY_FIELDS]
        if given or args.preset or args.out or args.config:
            dropped = ", ".join(given or ["--preset/--out"])
            raise DigitlabError(f"--resume continues the run with its own settings; drop {dropped}")
        config = None
    else:
        config = _with_flags(_base_config(args.preset, args.config), overrides)
    progress = TrainingProgress(quiet=args.quiet)
    try:
        result = fit(config, out_dir=args.out, resume=args.resume, callbacks=[progress],
                     progress=False,  # the CLI draws its own bar (TrainingProgress)
                     cuda_graphs=args.cuda_graphs)
    except TrainingInterrupted as stop:
        print(f"\ninterrupted: state saved at epoch {stop.epoch}, step {stop.step}.", file=sys.stderr)
        print(f"resume with: {stop.resume_command}", file=sys.stderr)
        return 130
    final = result.final
    if "val_acc" in final:
        print(f"validation accuracy {100 * final['val_acc']:.2f}%  ({result.run_dir})")
    return 0


def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    from digitlab.presets import list_presets

    ens = sub.add_parser(
        "ensemble",
        help="train N members (one preset with different seeds, or mixed --presets) into one folder",
        description="Members go to OUT/member-0 .. member-N-1 (seeds SEED .. SEED+N-1) and OUT/ensemble.json "
        "lists them; evaluate, predict, report and serve accept OUT and average the members' probabilities. "
        "Running the same command again skips finished members and resumes interrupted ones.",
    )
    ens.add_argument("--preset", default="best", help=f"recipe of every member: {', '.join(list_presets())}")
    ens.add_argument("--presets", default=None, metavar="A,B,...",
                     help="comma-separated recipes instead of --preset: member i trains recipe i mod their number "
                     "(--presets best,fast-long --members 4: best, fast-long, best, fast-long), so members differ in "
                     "architecture and augmentation, not only seed")
    ens.add_argument("--weights", choices=["equal", "logloss", "greedy"], default="equal",
                     help="average of the members' probabilities: equal; weighted by 1 / each member's "
                     "validation log-loss; or greedy: weights fitted on the validation split all members held "
                     "out, by forward selection on log-loss (a member that adds nothing gets 0). Stored in "
                     "ensemble.json (default: equal)")
    ens.add_argument("--members", type=_positive_int, default=5, help="how many members (default: 5)")
    ens.add_argument("--jobs", type=_positive_int, default=1,
                     help="members trained at once in separate processes, splitting the CPU cores (default: 1; on one "
                     "GPU, 5 at once took as long as 1 at a time: the card is busy with one)")
    ens.add_argument("--seed", type=_seed, default=None, help="seed of the first member (default: the preset's)")
    _add_recipe_flags(ens)
    ens.add_argument("--out", type=Path, required=True, help="ensemble folder")
    ens.add_argument("--quiet", action="store_true", help="only member start/end lines, no training progress")
    ens.set_defaults(handler=_run_ensemble)


def _run_ensemble(args: argparse.Namespace) -> int:
    from digitlab.ensemble import train_ensemble
    from digitlab.presets import get_preset
    from digitlab.progress import TrainingProgress
    from digitlab.train import TrainingInterrupted

    names = _preset_names(args.presets) if args.presets else [args.preset]
    overrides = _recipe_overrides(args)
    recipes = [_with_flags(get_preset(name), overrides) for name in names]
    training = TrainingProgress()

    def show(event: dict) -> None:
        kind = event["event"]
        if kind == "member_start":
            recipe = names[event["member"] % len(names)]
            print(f"member {event['member']} ({recipe}, seed {event['seed']}) started", file=sys.stderr)
        elif kind == "member_end":
            print(f"member {event['member']} finished", file=sys.stderr)
        elif kind == "ensemble_start":
            print(f"ensemble of {event['members']} x {','.join(names)} in {event['out']}: {event['todo']} to train, "
                  f"{event['jobs']} at a time", file=sys.stderr)
        elif not kind.startswith("ensemble") and not args.quiet:
            training(event)

    try:
        out = train_ensemble(recipes, args.out, args.members, jobs=args.jobs, first_seed=args.seed, callbacks=[show],
                             weights=args.weights, progress=False)
    except (KeyboardInterrupt, TrainingInterrupted):
        print(f"\ninterrupted; run the same command again to finish {args.out}", file=sys.stderr)
        return 130
    print(f"ensemble ready: {out}")
    return 0


def _preset_names(text: str) -> list[str]:
    """`--presets A,B,...` as a list of names (checked against the presets when they are looked up)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise DigitlabError(f"--presets {text!r} names no preset; write e.g. --presets best,fast-long")
    return names


def _add_kaggle(sub: argparse._SubParsersAction) -> None:
    kaggle = sub.add_parser(
        "kaggle", help="the Kaggle recipe: leaderboard forecast on a held-out fold, then submission.csv",
        description="1) Train an ensemble with --holdout of train.csv held out (the same images for every "
        "member) and measure it there with TTA: the leaderboard accuracy to expect, with its 95% interval "
        "(OUT/forecast.json). 2) Train the same ensemble on all of train.csv and predict test.csv with TTA "
        "into OUT/submission.csv. That is twice the training of one ensemble; run the same command again to "
        "resume after an interruption.",
    )
    kaggle.add_argument("train_csv", type=Path, metavar="TRAIN_CSV", help="Kaggle train.csv (label,pixel0..783)")
    kaggle.add_argument("test_csv", type=Path, metavar="TEST_CSV", help="Kaggle test.csv (pixel0..783)")
    kaggle.add_argument("--presets", default="best", metavar="A,B,...",
                        help="member recipes, member i trains recipe i mod their number (default: best)")
    kaggle.add_argument("--members", type=_positive_int, default=3, help="members per ensemble (default: 3)")
    kaggle.add_argument("--holdout", type=float, default=0.1,
                        help="share of train.csv held out for the forecast, stratified (default: 0.1)")
    kaggle.add_argument("--no-tta", dest="tta", action="store_false", help="no test-time augmentation")
    kaggle.add_argument("--jobs", type=_positive_int, default=1, help="members trained at once (default: 1)")
    kaggle.add_argument("--seed", type=_seed, default=0, help="seed of the first member and of the fold (default: 0)")
    kaggle.add_argument("--epochs", type=_positive_int, default=None, help="override the recipes' epochs")
    _add_graphs_flag(kaggle)
    kaggle.add_argument("--out", type=Path, default=Path("runs/kaggle"), help="folder (default: runs/kaggle)")
    kaggle.set_defaults(handler=_run_kaggle)


def _run_kaggle(args: argparse.Namespace) -> int:
    from digitlab.kaggle_recipe import kaggle_recipe
    from digitlab.presets import get_preset
    from digitlab.progress import TrainingProgress
    from digitlab.train import TrainingInterrupted

    recipes = [get_preset(name).with_overrides(epochs=args.epochs, cuda_graphs=args.cuda_graphs)
               for name in _preset_names(args.presets)]
    training = TrainingProgress()

    def show(event: dict) -> None:
        kind = event["event"]
        if kind == "stage":
            what = "forecast: ensemble with a held-out fold" if event["stage"] == "forecast" else \
                "submission: ensemble on all of train.csv"
            print(f"{what} -> {event['out']}", file=sys.stderr)
        elif kind == "forecast":
            print(f"expected leaderboard accuracy {100 * event['accuracy']:.2f}% (95% interval "
                  f"{100 * event['low95']:.2f}-{100 * event['high95']:.2f}%) on {event['images']:,} held-out images"
                  f"{', TTA' if event['tta'] else ''}", flush=True)
        elif kind == "member_start":
            print(f"member {event['member']} (seed {event['seed']}) started", file=sys.stderr)
        elif not kind.startswith(("ensemble", "member")):
            training(event)

    try:
        result = kaggle_recipe(args.train_csv, args.test_csv, recipes, args.out, members=args.members,
                               holdout=args.holdout, tta=args.tta, jobs=args.jobs, seed=args.seed,
                               callbacks=[show], progress=False)
    except (KeyboardInterrupt, TrainingInterrupted):
        print(f"\ninterrupted; run the same command again to finish {args.out}", file=sys.stderr)
        return 130
    print(f"wrote {result.submission} ({result.rows:,} rows)")
    return 0


def _add_summary(sub: argparse._SubParsersAction) -> None:
    summary = sub.add_parser(
        "summary", help="Keras-style table of a model's layers and parameters",
        description="Layer, output shape and parameters of a training preset's network (e.g. seed2017: 594,922 "
        "parameters), of a registered model, or of a trained run folder, with the totals.")
    summary.add_argument("target", help="a training preset (e.g. seed2017, quick, robust), a model name "
                         "(best, fast, resnet, seed2017) or a run folder")
    summary.set_defaults(handler=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    from digitlab.checkpoint import load_model
    from digitlab.models import create_model, list_models, summary_text
    from digitlab.presets import get_preset, list_presets

    if Path(args.target).is_dir():
        model, meta = load_model(args.target)
        title = f"{args.target}: preset {meta.get('preset', '?')}, model {meta['model']}"
    elif args.target in list_presets():
        config = get_preset(args.target)
        model, title = create_model(config.model, **config.model_args), f"preset {args.target}: model {config.model}"
    elif args.target in list_models():
        model, title = create_model(args.target), f"model {args.target}"
    else:
        raise DigitlabError(f"{args.target!r} is neither a run folder, a preset ({', '.join(list_presets())}) "
                            f"nor a model ({', '.join(list_models())})")
    print(summary_text(model, title))
    return 0


def _add_augment_preview(sub: argparse._SubParsersAction) -> None:
    from digitlab.presets import list_presets

    preview = sub.add_parser(
        "augment-preview", help="PNG grid of original digits beside augmented copies",
        description="One row per digit: the original, then COPIES draws of a preset's training augmentation "
        "(seed2017's is the notebook's Keras generator, zoom_range=1 included), to see what training shows the net.")
    preview.add_argument("--preset", default="seed2017", help=f"whose augmentation: {', '.join(list_presets())}")
    preview.add_argument("--data", default="mnist:test", help=SOURCE_HELP + " (default: mnist:test)")
    preview.add_argument("--n", type=_count_up_to(32), default=8, help="how many digits (rows), up to 32 (default: 8)")
    preview.add_argument("--copies", type=_count_up_to(16), default=5,
                         help="augmented copies per digit, up to 16 (default: 5)")
    preview.add_argument("--seed", type=_seed, default=0, help="augmentation seed (default: 0)")
    preview.add_argument("--out", type=Path, required=True, help="PNG file to write")
    preview.set_defaults(handler=_run_augment_preview)


def _run_augment_preview(args: argparse.Namespace) -> int:
    from digitlab.data import load_source
    from digitlab.presets import get_preset
    from digitlab.report import save_augment_preview

    out = save_augment_preview(load_source(args.data), get_preset(args.preset).augment, args.out,
                               n=args.n, copies=args.copies, seed=args.seed)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- serve and export


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="HTTP API (/v1/predict, /docs) and a drawing page for a trained run",
        description="Load the model once and serve it with uvicorn: POST /v1/predict (PNG/JPEG upload "
        "in field `file`, or JSON pixels), GET /v1/model, GET /healthz, the drawing page at /.",
    )
    serve.add_argument("run_dir", type=Path, nargs="?", default=None, metavar="RUN_DIR",
                       help="a run folder (or ensemble folder) (default: the newest finished `robust` run in runs/, "
                       "the preset for real handwriting)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    serve.add_argument("--port", type=_tcp_port, default=8000, help="TCP port, 1..65535 (default: 8000)")
    serve.add_argument("--backend", choices=["torch", "onnx"], default="onnx",
                       help="inference engine: onnx (ONNX Runtime, the model exported in memory at "
                       "start-up; less latency and CPU per request) or torch (default: onnx)")
    serve.set_defaults(handler=_run_serve)


def _tcp_port(text: str) -> int:
    """argparse type: a TCP port; 99999 would otherwise bind 99999 mod 65536 and log 99999."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1..65535")
    return port


def _run_serve(args: argparse.Namespace) -> int:
    from digitlab.serve import run_server

    run_server(args.run_dir or _default_run(), host=args.host, port=args.port, backend=args.backend)
    return 0


def _default_run() -> Path:
    """The run `serve` and `predict` use when none is named, said on stderr."""
    from digitlab.runs import SERVING_PRESET, newest_finished_run

    path = newest_finished_run()
    print(f"digitlab: using {path}, the newest finished {SERVING_PRESET} run in runs/", file=sys.stderr)
    return path


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", help="write a run as an ONNX model with its preprocessing in the metadata",
        description="Writes RUN_DIR (a run, or an ensemble as one graph averaging its members) as ONNX with the "
        "input scale, layout, class names and the weights' sha256 in its metadata, then checks ONNX Runtime "
        "against torch on MNIST test images. predict and serve use RUN_DIR/model.onnx with --backend onnx.")
    _add_run_dir(export)
    export.add_argument("--format", choices=["onnx"], default="onnx", help="output format (default: onnx)")
    export.add_argument("--out", type=Path, default=None, help="file to write (default: RUN_DIR/model.onnx)")
    export.add_argument("--no-check", action="store_true",
                        help="skip comparing ONNX Runtime with torch on 1,000 MNIST test images")
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from digitlab.export import export_onnx, parity_check

    out = export_onnx(args.run_dir, args.out)
    print(f"wrote {out}")
    if not args.no_check:
        report = parity_check(args.run_dir, out)
        print(f"parity: max |logit difference| {report['max_abs_diff']:.2e} on {report['images']} "
              f"{report['source']} images, predictions agree on {100 * report['agreement']:.2f}%")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    calibrate = sub.add_parser(
        "calibrate", help="fit a run's temperature (honest probabilities) on held-out data",
        description="Fit one temperature on the run's validation split (or --data) by minimising the "
        "negative log-likelihood and store it in RUN_DIR/calibration.json; predict, serve, evaluate and "
        "export apply it. `digitlab train` does this itself; use it for older runs and ensembles.",
    )
    calibrate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (or ensemble folder)")
    calibrate.add_argument("--data", default=None, metavar="SRC", help="labelled source to fit on (default: "
                           "the run's own validation split); never the test set you report on")
    calibrate.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from digitlab.evaluate import calibrate_run

    c = calibrate_run(args.run_dir, args.data)
    if c["seen_left_out"]:
        print(f"digitlab: {c['seen_left_out']:,} image(s) of {args.data} were in the run's training data and "
              "were left out", file=sys.stderr)
    print(f"temperature {c['temperature']:.3f} on {c['count']:,} images of {c['source']}: "
          f"NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}, "
          f"ECE {100 * c['before']['ece']:.2f}% -> {100 * c['after']['ece']:.2f}%; "
          f"wrote {args.run_dir / 'calibration.json'}")
    return 0


# ---------------------------------------------------------------- evaluate, report, predict


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "evaluate", help="accuracy, per-class metrics, confusion matrix and mistakes of a run",
        description="Predict a labelled source with a run (or ensemble) folder and compare with the labels. "
        "Mistakes are listed most confident first.",
    )
    _add_run_dir(evaluate)
    evaluate.add_argument("--data", default=None, help=SOURCE_HELP + " (default: mnist:test for a run trained "
                          "on MNIST, else the run's own held-out validation split)")
    evaluate.add_argument("--include-seen", action="store_true",
                          help="keep images the run trained on in the metrics (default: left out; inflates them)")
    evaluate.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                          help="inference precision (int8: static quantization calibrated on training images)")
    evaluate.add_argument("--json", action="store_true", help="print JSON (all mistakes) instead of a table")
    evaluate.add_argument("--tta", action="store_true",
                          help="test-time augmentation: average over 1-px shifts and +-8 degree tilts (7x slower)")
    evaluate.add_argument("--mistakes", type=_non_negative_int, default=20, metavar="N",
                          help="table only: how many mistakes to list (default: 20)")
    evaluate.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from digitlab.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.data, tta=args.tta, precision=args.precision,
                          include_seen=args.include_seen)
    for note in result.extra["notes"]:
        print(f"digitlab: {note}", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_text(max_mistakes=args.mistakes))
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report", help="one self-contained HTML report of a run (curves, confusion, mistakes, model)",
        description="Write an HTML file with every figure embedded (readable offline) and each figure as a "
        "PNG beside it.",
    )
    _add_run_dir(report)
    report.add_argument("--data", default=None, help=SOURCE_HELP + " (default: mnist:test for a run trained "
                        "on MNIST, else the run's own held-out validation split)")
    report.add_argument("--include-seen", action="store_true",
                        help="keep images the run trained on in the figures (default: left out)")
    report.add_argument("--out", type=Path, default=None, help="HTML file (default: RUN_DIR/report/report.html)")
    report.add_argument("--tta", action="store_true", help="evaluate with test-time augmentation")
    report.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from digitlab.report import write_report

    out = write_report(args.run_dir, data=args.data, out=args.out, tta=args.tta, include_seen=args.include_seen)
    print(f"wrote {out}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser(
        "predict", help="predict digits in Kaggle CSV, IDX, .npy, PNG/JPEG files or folders",
        description="Images (PNG/JPEG, or folders of them) are made MNIST-like first: inverted if on light "
        "paper, cropped to the ink, scaled to 20 px and centred by mass in 28x28. A bad file is reported on "
        "stderr and skipped; the exit status is then 2.",
        epilog="Kaggle: digitlab predict RUN_DIR kaggle:test.csv --format kaggle --out submission.csv",
    )
    predict.usage = "digitlab predict [-h] [options] [RUN_DIR] INPUT [INPUT ...]"
    predict.add_argument("inputs", nargs="+", metavar="[RUN_DIR] INPUT",
                         help="RUN_DIR: a run (or ensemble) folder; left out, the newest finished `robust` run in "
                         "runs/. INPUT: kaggle:test.csv or *.csv, IDX image file, .npy (N,28,28)/(N,784), image "
                         "file, or folder of images")
    predict.add_argument("--out", type=Path, default=None,
                         help="file to write (default: stdout; submission.csv for --format kaggle)")
    predict.add_argument("--format", choices=["csv", "json", "kaggle"], default="csv",
                         help="csv: source,digit,probability,top_k,uncertain,reason; json: a list of objects; "
                         "kaggle: ImageId,Label (default: csv)")
    predict.add_argument("--top-k", type=_positive_int, default=3, metavar="K",
                         help="how many most likely digits to list (default: 3)")
    predict.add_argument("--tta", action="store_true", help="test-time augmentation (7 views, 7x slower)")
    predict.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                         help="images per forward pass (default: 2048)")
    predict.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                         help="inference engine: torch, or onnx (ONNX Runtime; RUN_DIR/model.onnx if "
                         "fresh, else exported on the fly) (default: torch)")
    predict.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                         help="torch backend: auto (bf16 on CPUs with native bf16), fp32, bf16, or int8 "
                         "(static quantization calibrated on training images; fastest on VNNI CPUs)")
    predict.set_defaults(handler=_run_predict)


def _refuse_a_model_as_input(first: Path) -> None:
    """A first argument that names a model, but not as a run folder, would otherwise be read as an
    input (an .onnx file as an image, a folder of runs as a folder of images: their report PNGs)
    and the default robust run would answer instead of the model the user meant."""
    from digitlab.rundir import is_ensemble
    from digitlab.runs import is_run_folder

    if first.suffix.lower() == ".onnx":
        raise DigitlabError(f"{first}: an ONNX model, not an input; predict takes a run folder (with --backend "
                            f"onnx it uses the folder's model.onnx); `digitlab serve {first}` serves a bare .onnx file")
    if first.is_dir() and any(is_run_folder(c) or is_ensemble(c) for c in first.iterdir() if c.is_dir()):
        raise DigitlabError(f"{first}: a folder of runs, not of images; name one run folder "
                            "(`digitlab runs` lists them)")


def _run_predict(args: argparse.Namespace) -> int:
    from digitlab.predict import predict_inputs, render, write_output
    from digitlab.rundir import is_ensemble
    from digitlab.runs import is_run_folder

    first = Path(args.inputs[0])
    if is_run_folder(first) or is_ensemble(first):
        if len(args.inputs) == 1:
            raise DigitlabError(f"{first} is a run folder: name at least one INPUT to predict after it")
        run_dir, inputs = first, args.inputs[1:]
    else:
        _refuse_a_model_as_input(first)
        run_dir, inputs = _default_run(), args.inputs
    result = predict_inputs(run_dir, inputs, top_k=args.top_k, tta=args.tta,
                            batch_size=args.batch_size, backend=args.backend, precision=args.precision)
    for note in result.notes:
        print(f"digitlab: note: {note}", file=sys.stderr)
    for error in result.errors:
        print(f"digitlab: error: {error}", file=sys.stderr)
    if result.predictions:
        text = render(result, args.format)
        out = args.out or (Path("submission.csv") if args.format == "kaggle" else None)
        if out is None:
            sys.stdout.write(text)
        else:
            write_output(text, out)
            print(f"wrote {out} ({len(result.predictions):,} predictions)", file=sys.stderr)
    if result.errors:
        print(f"digitlab: {len(result.errors)} input(s) failed, {len(result.predictions):,} images predicted",
              file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- runs


def _add_runs(sub: argparse._SubParsersAction) -> None:
    from digitlab.runs import COLUMNS

    runs = sub.add_parser(
        "runs", help="table of the run and ensemble folders under DIR",
        description="One row per run, ensemble and ensemble member: preset, training data and its fingerprint, "
        "epochs done/planned, validation accuracy, training time, and state (finished, or interrupted with the "
        "command that resumes it). Damaged and foreign folders are listed as such.",
    )
    runs.add_argument("dir", type=Path, nargs="?", default=Path("runs"), metavar="DIR",
                      help="folder holding run folders, or one run/ensemble folder (default: runs)")
    runs.add_argument("--json", action="store_true", help="print JSON (every field) instead of a table")
    runs.add_argument("--sort", choices=COLUMNS, default="name", metavar="COLUMN",
                      help=f"sort by this column: {', '.join(COLUMNS)} (default: name)")
    runs.add_argument("--reverse", action="store_true", help="sort in descending order")
    runs.set_defaults(handler=_run_runs)


def _run_runs(args: argparse.Namespace) -> int:
    from digitlab.runs import list_runs, runs_table

    rows = list_runs(args.dir, sort=args.sort, reverse=args.reverse)
    print(json.dumps([row.to_dict() for row in rows], indent=2) if args.json else runs_table(rows))
    return 0


# ---------------------------------------------------------------- main

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_data,
    _add_train,
    _add_ensemble,
    _add_kaggle,
    _add_summary,
    _add_augment_preview,
    _add_serve,
    _add_export,
    _add_calibrate,
    _add_evaluate,
    _add_report,
    _add_predict,
    _add_runs,
]


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
    except OSError as exc:  # an --out that is a file, a folder, unwritable or on a full disk
        logging.getLogger("digitlab").info("where it came from", exc_info=True)  # -v: the traceback too
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"digitlab: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training installs its own handler (e.g. while torch imports)
        print("\ninterrupted", file=sys.stderr)
        return 130
