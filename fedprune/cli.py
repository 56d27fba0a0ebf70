"""Command line: ``fedprune {train,prune,simulate}``.

Bad configs and missing data end with one clear line on stderr and exit
code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedprune.config import REPO_ROOT, ConfigError, deep_update, load_config, parse_overrides
from fedprune.reporting import check_out_dir, nonnegative_int

__all__ = ["main", "run_reporting_errors"]

EXIT_USAGE = 2
#: ``simulate --mask-source`` choices (fedprune.federated.MASK_SOURCES; listed here so that ``--help`` imports no torch).
MASK_SOURCE_CHOICES = ("consensus", "local", "random", "central", "none")


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by what the user gave (config, data, budgets, checkpoints): one line, no traceback."""
    from fedprune.allocation import InfeasibleBudgetError
    from fedprune.checkpoint import CheckpointError
    from fedprune.data import DataNotFoundError, InvalidDataError

    return (ConfigError, DataNotFoundError, InvalidDataError, InfeasibleBudgetError, CheckpointError)


def run_reporting_errors(fn, prog: str) -> int:
    """``fn()``, with a user error (:func:`user_errors`) printed as ``prog: error: ...`` and exit code 2; the
    command-line scripts under simulation/ run their ``main`` through it."""
    try:
        return fn()
    except user_errors() as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (see configs/; simulate defaults to configs/quick.toml)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys, e.g. pruning.sparsity=0.7")
    parser.add_argument("--data-dir", help="directory containing cifar-10-batches-py (same as data.data_dir)")
    parser.add_argument("--dataset", choices=["cifar10", "synthetic"], help="same as data.dataset")
    parser.add_argument("--seed", type=int, help="same as seed")
    parser.add_argument("-v", "--verbose", action="store_true")


def _load(args, default_config: str | None = None) -> "ExperimentConfig":  # noqa: F821
    """The config file with ``--set`` overrides, then the flags (which win); flag values are taken as they are,
    not parsed as TOML, so any directory name works."""
    if args.config is not None and not args.config.strip():
        raise ConfigError("--config '' is empty; give a TOML config file (see configs/)")
    overrides = parse_overrides(list(args.overrides))
    flags: dict = {}
    data = {k: v for k, v in (("data_dir", args.data_dir), ("dataset", args.dataset)) if v}
    if data:
        if not isinstance(overrides.get("data", {}), dict):
            raise ConfigError(f"override data = {overrides['data']!r} conflicts with --data-dir/--dataset: 'data' is a table")
        flags["data"] = data
    if args.seed is not None:
        flags["seed"] = args.seed
    return load_config(args.config or default_config, deep_update(overrides, flags))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprune", description="Federated edge-device structured pruning simulator")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the dense model centrally and print test accuracy")
    _common(p)
    p.add_argument("--epochs", type=nonnegative_int, help="same as train.epochs")
    p.add_argument("--out", help="output directory for model_dense.pt (state_dict) and results.json (optional)")
    _overwrite(p)

    p = sub.add_parser("prune", help="one centralized pruning experiment -> OUT/results.json")
    _common(p)
    p.add_argument("--out", required=True, help="output directory")
    _overwrite(p)

    p = sub.add_parser("simulate", help="federated consensus pruning, on Flower's Simulation Engine (Ray) or in this process")
    _common(p)
    out = p.add_mutually_exclusive_group()  # one of them is required but for --dry-run (checked in _cmd_simulate)
    out.add_argument("--out", help="output directory (the server checkpoints there after every round)")
    out.add_argument("--resume", metavar="DIR", help="continue the killed run in DIR from its last complete round (config from its checkpoint)")
    _overwrite(p)
    p.add_argument("--warm-start", metavar="DIR", help="start after the dense warm-up of the run in DIR (same config but for "
                   "pruning, fine-tuning and evaluation keys) instead of training it again; DIR is a run that stopped after its "
                   "warm-up: --mask-source none --set federated.finetune_rounds=0")
    p.add_argument("--mask-source", choices=MASK_SOURCE_CHOICES, default="consensus",
                   help="where the masks come from: consensus (the clients' aggregated importance; default); the baselines local "
                   "(each client its own top-k), random (seeded random channels at the same widths), central (the same criterion "
                   "on the pooled scoring images); none (dense FedAvg, no pruning)")
    p.add_argument("--dry-run", action="store_true", help="print what the run would do (clients and their profiles and "
                   "shards, budgets, steps by round) after the checks a run makes before its first round; run nothing, write nothing")
    p.add_argument("--engine", choices=["ray", "inprocess"], default="ray", help="ray: Flower Simulation Engine; inprocess: the same ClientApp handlers and Flower messages in this process, one client after another, no Ray (debugging, baselines)")
    return parser


def _overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds a finished run (its "
                        "results.json is removed first; its other files are replaced as the new run writes them); without it "
                        "such an --out is refused")


def _cmd_train(args) -> int:
    from fedprune.centralized import train_dense

    cfg = _load(args)
    out = None
    if args.out is not None:
        out = check_out_dir(args.out)
        _guard_finished_run(out, args.overwrite)
    dense = train_dense(cfg, epochs=args.epochs)
    print(f"dense {cfg.model.name} on {cfg.data.dataset}: {dense.epochs} epochs, test accuracy {dense.metrics['accuracy']:.4f} ({dense.metrics['num_examples']} images)")
    if out is not None:
        import torch

        from fedprune.config import config_to_dict
        from fedprune.reporting import write_json

        out.mkdir(parents=True, exist_ok=True)
        torch.save(dense.model.state_dict(), out / "model_dense.pt")
        write_json(out / "results.json", {"config": config_to_dict(cfg), "dense": {**dense.metrics, "epochs": dense.epochs}})
        print(f"wrote {out / 'model_dense.pt'} and {out / 'results.json'}")
    return 0


def _cmd_prune(args) -> int:
    from fedprune.centralized import run_centralized

    cfg = _load(args)
    _guard_finished_run(check_out_dir(args.out), args.overwrite)
    res = run_centralized(cfg, args.out)
    d, p = res["dense"], res["pruned"]
    print(f"dense accuracy {d['accuracy']:.4f}; pruned ({p['schedule']}, {p['criterion']}, {100 * p['channel_sparsity']:.0f}% channels pruned) "
          f"{p['accuracy_before_finetune']:.4f} -> {p['accuracy']:.4f} after fine-tuning; MACs {p['flops_reduction']:.2f}x fewer")
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def _guard_finished_run(out: Path, overwrite: bool, remove: bool = True) -> None:
    """A new run into ``out`` would replace the finished run there, file by file: refuse it unless ``--overwrite``;
    with it, remove the old ``results.json`` first (unless ``remove`` is false: a dry run), so that a new run that
    stops early never looks finished."""
    results = out / "results.json"
    if results.is_file():
        if not overwrite:
            raise ConfigError(f"--out {str(out)!r} already holds a finished run ({str(results)!r}); give another --out, "
                              "or pass --overwrite to replace it")
        if remove:
            results.unlink()


def _refuse_unfinished_run(out: Path) -> None:
    """A fresh run into ``out`` would delete the checkpoint of the unfinished run there: refuse."""
    from fedprune.checkpoint import CHECKPOINT_FILE

    ckpt, results = out / CHECKPOINT_FILE, out / "results.json"
    # a run writes its checkpoint after every step and results.json last: a checkpoint newer than the results is unfinished
    if ckpt.is_file() and (not results.is_file() or results.stat().st_mtime < ckpt.stat().st_mtime):
        raise ConfigError(f"--out {str(out)!r} holds the checkpoint of an unfinished run; continue it with --resume {str(out)!r}, "
                          f"or give another --out (or delete {str(ckpt)!r} to start over there)")


def _print_dry_run(cfg, mask_source: str, warm_start: str | None = None, resume: str | None = None) -> int:
    from fedprune.federated import describe_run

    print(describe_run(cfg, mask_source, warm_start, resume))
    print("dry run: no round was run and no run directory was written")
    return 0


def _cmd_simulate(args) -> int:
    from fedprune.federated import resume_config, simulate

    for flag, value in (("--resume", args.resume), ("--warm-start", args.warm_start)):
        if value is not None and not value.strip():
            raise ConfigError(f"{flag} '' is empty; give a run directory")
    if args.resume and args.warm_start:
        raise ConfigError("--resume continues a run that already has its warm-up; drop --warm-start")
    if args.resume:
        given = [flag for flag, v in (("--config", args.config), ("--set", args.overrides), ("--data-dir", args.data_dir),
                                      ("--dataset", args.dataset), ("--seed", args.seed)) if v not in (None, [])]
        if given:
            raise ConfigError(f"--resume takes the config from the run's checkpoint; drop {', '.join(given)}")
        if args.mask_source != "consensus" or args.overwrite:
            raise ConfigError(f"--resume takes the mask source from the run's checkpoint and writes into its directory; drop "
                              f"{'--mask-source' if args.mask_source != 'consensus' else '--overwrite'}")
        cfg, mask_source = resume_config(args.resume)
        if args.dry_run:
            return _print_dry_run(cfg, mask_source, resume=args.resume)
        res = simulate(cfg, out_dir=args.resume, engine=args.engine, mask_source=mask_source, resume=True)
    else:
        cfg = _load(args, default_config=str(REPO_ROOT / "configs" / "quick.toml"))
        if args.out is None and not args.dry_run:
            raise ConfigError("simulate needs --out DIR (a new run) or --resume DIR (a killed run); --dry-run needs neither")
        if args.out is not None:  # checked under --dry-run too, but nothing is removed then
            out = check_out_dir(args.out)
            if args.warm_start and Path(args.warm_start).resolve() == out.resolve():
                raise ConfigError(f"--out and --warm-start name the same directory {str(args.out)!r}: the run would overwrite the "
                                  "warm-up it starts from; give another --out")
            _refuse_unfinished_run(out)
            _guard_finished_run(out, args.overwrite, remove=not args.dry_run)
        if args.dry_run:
            return _print_dry_run(cfg, args.mask_source, warm_start=args.warm_start)
        res = simulate(cfg, out_dir=args.out, engine=args.engine, mask_source=args.mask_source, warm_start=args.warm_start)
    print(res["summary"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command = {"train": _cmd_train, "prune": _cmd_prune, "simulate": _cmd_simulate}[args.command]
    return run_reporting_errors(lambda: command(args), "fedprune")


if __name__ == "__main__":
    sys.exit(main())
