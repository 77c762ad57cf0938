"""The ``raymix`` command line: parses, validates, dispatches. Nothing else lives here.

``train`` and ``tune`` are thin layers over :func:`raymix.api.fit` and :func:`raymix.api.tune`.
Only cheap modules are imported here (the config models): torch, timm, Ray, Optuna and
MLflow are imported by the command that needs them, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from raymix.api import uses_ray
from raymix.config import DEFAULT_METHOD, METHOD_CONFIGS, Config, ConfigError, load_config
from raymix.errors import RunFailedError

__all__ = ["main", "uses_ray"]

EXIT_BAD_INPUT = 2


def _options(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per config key: dotted name, default and description (for --help)."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += _options(annotation, f"{prefix}{name}.")
            continue
        if model is Config and name == "method":
            lines += _method_options()
            continue
        default = field.get_default(call_default_factory=True)
        note = f"  {field.description}" if field.description else ""
        if get_origin(annotation) is Literal:
            note = f"  one of: {', '.join(map(str, get_args(annotation)))}.{note}"
        lines.append(f"  {prefix}{name} = {json.dumps(default, default=str)}{note}")
    return lines


def _method_options() -> list[str]:
    """``method.name``, then each method's own keys under its heading (from its config model)."""
    names = ", ".join(METHOD_CONFIGS)
    lines = [f"  method.name = {json.dumps(DEFAULT_METHOD)}  one of: {names}. Each method has its own keys:"]
    for name, model in METHOD_CONFIGS.items():
        own = [line for line in _options(model, "method.") if not line.startswith("  method.name =")]
        lines += [f"  [{name}] method.name={name}", *(f"  {line}" for line in own)]
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymix",
        description="Train self-supervised vision encoders and search their hyperparameters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keys = "config keys (defaults shown; override any with key=value):\n" + "\n".join(_options(Config))

    train = sub.add_parser(
        "train",
        help="train one run in this process",
        description="Train the encoder described by CONFIG. Running the same run again resumes it "
        "from its latest checkpoint in training.output_dir (default runs/<run_name>).",
        epilog=keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", metavar="CONFIG", help="YAML config file (see launch/experiments/)")
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-3"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser(
        "eval",
        help="evaluate a saved checkpoint",
        description="kNN (default) and/or linear probe of a checkpoint's encoder on its run's dataset. "
        "The checkpoint's own config is used; KEY=VALUE pairs override it.",
        epilog=keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a .pt file or Ray Train checkpoint folder written by raymix train",
    )
    ev.add_argument("--knn", action="store_true", help="kNN top-1 (the default when neither flag is given)")
    ev.add_argument("--linear", action="store_true", help="linear probe on frozen features")
    ev.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="overrides of the saved config, e.g. data.root=/data training.device=cpu eval.knn_k=[10]",
    )  # fmt: skip
    tune = sub.add_parser(
        "tune",
        help="search hyperparameters with Ray Tune, Optuna and ASHA",
        description="Run the sweep described by SPACE (see search_spaces/): one trial per sampled "
        "point, recorded in MLflow. The sweep folder is <storage_path>/<name> (default sweeps/<file stem>).",
        epilog=keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument("space", metavar="SPACE", help="search space YAML file")
    tune.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of the base config, e.g. training.epochs=4",
    )
    tune.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    tune.add_argument("--name", help="sweep name (default: the space's name, else the file's stem)")
    # Sweep controls: each replaces the space's own key (parsed and checked in _sweep_controls).
    tune.add_argument(
        "--num-samples", metavar="N", help="number of trials (default: the space's num_samples)"
    )
    tune.add_argument(
        "--max-concurrent", metavar="N",
        help="trials running at once (default: the space's max_concurrent_trials, else as many as "
        "the cluster holds at most, counting nodes its autoscaler may add)",
    )  # fmt: skip
    tune.add_argument(
        "--gpus-per-trial", metavar="X",
        help="single-worker GPU trials (scaling.use_gpu=true): the share of one GPU each takes, "
        "0 < X <= 1; 0.25 packs four trials on a GPU (default: the space's gpus_per_trial, else 1)",
    )  # fmt: skip
    tune.add_argument(
        "--time-budget", metavar="DURATION",
        help="stop the sweep after this long (seconds, or 90s, 30m, 2h, 1h30m): running trials are "
        "stopped, finished ones kept (default: the space's time_budget, else none)",
    )  # fmt: skip
    tune.add_argument(
        "--stop", action="append", metavar="METRIC=VALUE",
        help="stop the sweep once a trial reaches VALUE of the sweep's metric (>= for mode max, "
        "<= for min), e.g. --stop knn_top1=0.9 (default: the space's stop)",
    )  # fmt: skip
    tune.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="the Optuna study's storage, for optuna-dashboard: an RDB URL (sqlite:///optuna.db, "
        "postgresql://...), a journal file, or memory (default: searcher.storage, else "
        "<sweep folder>/optuna.journal)",
    )

    submit = sub.add_parser(
        "submit",
        help="run tune or train on a Ray cluster as a Ray job",
        description="Submit `raymix COMMAND ...` to a Ray cluster's job server (Ray's job SDK) with "
        "this folder as the job's working directory. Prints the job's id and dashboard link, follows "
        "its logs and exits 0 if it succeeded, 1 if it failed or was stopped (--no-wait: 0 once "
        "submitted). While the head's job agent is not ready yet the job is submitted again (up to "
        "90 s). Token authentication: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
        epilog="example: raymix submit --address http://127.0.0.1:8265 --storage /shared/sweeps "
        "--tracking-uri http://127.0.0.1:5000 -- tune search_spaces/quickstart.yaml",
    )
    submit.add_argument(
        "--address",
        help="the head's job server, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS; "
        "not needed with --dry-run)",
    )
    submit.add_argument(
        "--storage",
        help="absolute path or URI for sweep folders and checkpoints (RAYMIX_STORAGE_PATH in the job); "
        "shared storage (NFS, s3://) on multi-node clusters",
    )
    submit.add_argument(
        "--tracking-uri", help="MLflow tracking server the job records to (default: MLFLOW_TRACKING_URI)"
    )
    submit.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="another environment variable"
    )
    submit.add_argument("--working-dir", default=".", help="folder uploaded as the job's working directory")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.add_argument(
        "--dry-run",
        action="store_true",
        help="check the job and print the request as JSON (entrypoint, runtime_env, submission_id, "
        "metadata; secrets masked); submit nothing",
    )
    submit.add_argument(
        "job", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="tune SPACE ... or train CONFIG ..."
    )

    best = sub.add_parser(
        "best",
        help="print a sweep's leaderboard and write its best config",
        description="Rank the trials of SWEEP (a sweep folder) and write the best trial's config as a "
        "YAML file that raymix train accepts.",
    )
    best.add_argument("sweep", metavar="SWEEP", help="sweep folder, e.g. sweeps/quickstart")
    best.add_argument("--out", help="where to write the config (default: SWEEP/best_config.yaml)")

    preview = sub.add_parser(
        "preview",
        help="draw a few training images and their augmented views as a PNG",
        description="Write a PNG grid with one row per training image: the image, then view 1 and "
        "view 2 after every augmentation of CONFIG (the first images of epoch 0, seeded by "
        "training.seed: the same command writes the same file). Runs on the CPU; nothing is trained.",
        epilog=keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preview.add_argument("config", metavar="CONFIG", help="YAML config file (see launch/experiments/)")
    preview.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. augment.crop_scale=[0.5,1]"
    )
    preview.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write (folder created)")
    preview.add_argument("--count", type=int, default=8, help="number of images (rows), default 8")
    return parser


def _train(args: argparse.Namespace) -> int:
    from raymix import api

    result = api.fit(args.config, args.overrides, progress=not args.no_progress)
    if result.backend == "local":  # Ray Train's driver prints its own summary
        metrics = result.metrics
        print(f"final: knn_top1 {metrics['knn_top1']:.4f} (at initialisation {metrics['knn_top1_init']:.4f})")
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from raymix.config import apply_overrides, config_from_dict
    from raymix.engine.checkpoint import load_checkpoint
    from raymix.engine.trainer import Trainer

    path = Path(args.checkpoint)
    if path.is_dir():  # a Ray Train checkpoint folder
        path = path / "state.pt"
    state = load_checkpoint(path)
    cfg = config_from_dict(apply_overrides(state["config"], args.overrides))
    trainer = Trainer(cfg)
    trainer.method.load_state_dict(state["method"])
    metrics: dict[str, Any] = {"epoch": state["epoch"]}
    if args.knn or not args.linear:
        metrics.update(trainer.evaluate())
    if args.linear:
        metrics.update({k: v for k, v in trainer.evaluate(linear=True).items() if k.startswith("linear")})
    print(json.dumps(metrics, indent=2))
    return 0


def _count(flag: str, text: str, what: str) -> int:
    from raymix.config import MAX_COUNT

    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{flag} {text}: expected a whole number of {what}, at least 1") from None
    if value < 1:
        raise ConfigError(f"{flag} {text}: must be at least 1")
    if value > MAX_COUNT:
        raise ConfigError(f"{flag} {text}: must be at most {MAX_COUNT}")
    return value


def _sweep_controls(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep controls given as flags, as space keys; bad values name the flag."""
    import math

    from raymix.integrations.search_space import DURATION_HELP, MAX_TIME_BUDGET_S, parse_duration

    controls: dict[str, Any] = {}
    if args.num_samples is not None:
        controls["num_samples"] = _count("--num-samples", args.num_samples, "trials")
    if args.max_concurrent is not None:
        controls["max_concurrent_trials"] = _count("--max-concurrent", args.max_concurrent, "trials")
    if args.gpus_per_trial is not None:
        try:
            share = float(args.gpus_per_trial)
        except ValueError:
            share = math.nan
        if not 0 < share <= 1:
            raise ConfigError(
                f"--gpus-per-trial {args.gpus_per_trial}: expected a share of one GPU, 0 < X <= 1 "
                "(e.g. 0.5: two trials per GPU)"
            )
        controls["gpus_per_trial"] = share
    if args.time_budget is not None:
        try:
            budget = parse_duration(args.time_budget)
        except ValueError:
            budget = 0.0
        if not 0 < budget <= MAX_TIME_BUDGET_S:
            raise ConfigError(
                f"--time-budget {args.time_budget}: expected {DURATION_HELP}, more than 0 and at most a year"
            )
        controls["time_budget"] = budget
    if args.stop:
        targets: dict[str, float] = {}
        for item in args.stop:
            metric, _, text = item.partition("=")
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not metric.strip() or not math.isfinite(value):
                raise ConfigError(
                    f"--stop {item}: expected METRIC=VALUE with a number, e.g. --stop knn_top1=0.9"
                )
            targets[metric.strip()] = value
        controls["stop"] = targets
    return controls


def _tune(args: argparse.Namespace) -> int:
    from raymix import api

    board = api.tune(
        args.space, args.overrides, name=args.name, resume=args.resume,
        optuna_storage=args.optuna_storage, **_sweep_controls(args),
    )  # fmt: skip
    best = board.best_row()
    unfinished = [row for row in board.rows if row.outcome not in ("completed", "pruned", "failed")]
    if unfinished:
        print(f"{len(unfinished)} trial(s) unfinished: continue with raymix tune {args.space} --resume")
        return 1
    if best is None:
        print("no trial reported the metric: every trial failed", file=sys.stderr)
        return 1
    print(
        f"best: trial {best.trial_id} {board.metric} {best.last:.4f}; config in {board.path}/best_config.yaml"
    )
    return 0


def _submit(args: argparse.Namespace) -> int:
    from raymix.integrations import jobs

    entrypoint = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not entrypoint or entrypoint[0] not in ("tune", "train"):
        got = repr(entrypoint[0]) if entrypoint else "nothing"
        raise ConfigError(f"raymix submit: expected -- tune SPACE ... or -- train CONFIG ..., got {got}")
    inner, extra = _parser().parse_known_args(entrypoint)
    unknown = [token for token in extra if token.startswith("-") or "=" not in token]
    if unknown:
        raise ConfigError(f"raymix submit: {entrypoint[0]}: unrecognized arguments: {' '.join(unknown)}")
    file = inner.space if inner.command == "tune" else inner.config
    job = jobs.prepare_job(
        entrypoint,
        (inner.command, file, [*inner.overrides, *extra]),
        address=args.address,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        env=args.env,
        working_dir=args.working_dir,
        no_wait=args.no_wait,
    )
    return jobs.submit(job, dry_run=args.dry_run)


def _best(args: argparse.Namespace) -> int:
    import yaml

    from raymix.integrations import leaderboard

    folder = Path(args.sweep)
    if not leaderboard.is_sweep(folder):
        raise ConfigError(f"{args.sweep!r} is not a sweep folder written by raymix tune (e.g. sweeps/NAME)")
    board = leaderboard.load(str(folder.resolve()))
    print(board.format())
    if board.best_row() is None:
        raise ConfigError(f"{args.sweep}: no trial has reported {board.metric} yet")
    out = Path(args.out) if args.out else folder / leaderboard.BEST_CONFIG_FILE
    out.write_text(yaml.safe_dump(board.best_config(), sort_keys=False))
    print(f"best config written to {out}: raymix train {out}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    if Path(args.out).suffix.lower() != ".png":
        raise ConfigError(f"--out {args.out!r}: the preview is a PNG; give a file name ending in .png")
    if args.count < 1:
        raise ConfigError(f"--count {args.count}: must be at least 1")
    cfg = load_config(args.config, args.overrides)
    from raymix.data.preview import make_grid, preview_rows, write_png

    rows = preview_rows(cfg, count=args.count)
    out = write_png(make_grid(rows), args.out)
    print(f"training images {rows.indices} (original, view 1, view 2 per row) written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after flags: collect the ones argparse left over.
    args, extra = parser.parse_known_args(argv)
    unknown = [token for token in extra if token.startswith("-") or "=" not in token]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        commands = {
            "train": _train,
            "eval": _eval,
            "tune": _tune,
            "submit": _submit,
            "best": _best,
            "preview": _preview,
        }
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"raymix: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailedError as exc:
        print(f"raymix: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raymix: interrupted; the latest checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
