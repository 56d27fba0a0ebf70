"""Scripted sweeps: the cross product of config keys x seeds, one federated run per cell.

    python simulation/sweep.py --grid configs/sweeps/noniid.toml --out runs/sweeps/noniid [--benchmarks noniid]

The grid file (see configs/sweeps/ and fedprune/sweep.py) names a base config,
[fixed] overrides, [grid] keys with their values, the seeds and the engine.
Every cell's config is validated before anything runs. Each cell runs
`fedprune simulate` into OUT/cells/<cell-id>/; cells whose results.json exists
(with the same config) are skipped, so an interrupted sweep continues where it
stopped. A crashing cell is logged and the sweep goes on. Writes
OUT/summary.csv (one row per cell), OUT/summary.md (mean ± std over seeds) and
plots; --benchmarks NAME also writes benchmarks/sweep_NAME.md, .csv and PNGs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune.reporting import BENCHMARKS_DIR, SHARED_SUBSET  # noqa: E402
from fedprune.sweep import SweepError, load_grid, run_sweep, write_report  # noqa: E402
from fedprune.config import ConfigError  # noqa: E402
from fedprune.reporting import check_out_dir  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="sweep grid file (TOML), e.g. configs/sweeps/noniid.toml")
    parser.add_argument("--out", required=True, help="sweep directory: cells/<id>/, summary.csv, summary.md, plots")
    parser.add_argument("--data-dir", default=os.environ.get("FEDPRUNE_DATA_DIR") or (str(SHARED_SUBSET) if SHARED_SUBSET.is_dir() else ""),
                        help="folder holding cifar-10-batches-py (default: FEDPRUNE_DATA_DIR, else the shared subset)")
    parser.add_argument("--benchmarks", metavar="NAME", nargs="?", const="", default=None,
                        help="also write benchmarks/sweep_NAME.md, .csv and PNGs (NAME defaults to the grid's name)")
    parser.add_argument("--benchmarks-dir", default=str(BENCHMARKS_DIR), help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="validate the grid and every cell's config, list the cells, run nothing")
    parser.add_argument("--report-only", action="store_true", help="run nothing; rebuild the summary from the finished cells")
    parser.add_argument("--note", default="", help="a sentence added to the summary (e.g. how loaded the machine was)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show every round's log on the console too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # rounds go to each cell's run.log; the console shows the sweep's progress and warnings
        for name in ("fedprune.server", "fedprune.client", "flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("fedprune.server").setLevel(logging.INFO)
        logging.getLogger().handlers[0].addFilter(lambda rec: rec.name == "fedprune.sweep" or rec.levelno >= logging.WARNING)
    os.environ.setdefault("MPLCONFIGDIR", str(ROOT / ".cache" / "matplotlib"))
    t0 = time.perf_counter()
    try:
        grid = load_grid(args.grid)
        cells = grid.validate(args.data_dir or None)
        check_out_dir(args.out)
        if args.dry_run:
            print(f"{args.grid}: {len(cells)} cells ({grid.engine} engine), all configs valid")
            for cell, _ in cells:
                print(f"  {cell.index + 1:3d}. {cell.id}")
            return 0
        if args.report_only:
            from fedprune.sweep import _finished, _read_meta, summary_row

            rows = []
            for cell, cfg in cells:
                cdir = Path(args.out) / "cells" / cell.id
                res = _finished(cdir, cfg, grid.mask_source)
                if res is not None:
                    rows.append(summary_row(cell, res, "done", _read_meta(cdir).get("wall_s", res["totals"]["wall_s"])))
                else:
                    rows.append(summary_row(cell, None, "failed" if (cdir / "error.txt").is_file() else "missing", None,
                                            "see error.txt" if (cdir / "error.txt").is_file() else "not run"))
        else:
            rows = run_sweep(grid, args.out, args.data_dir or None)
    except (SweepError, ConfigError) as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    bench = None if args.benchmarks is None else (args.benchmarks_dir)
    path = write_report(grid, rows, args.out, args.data_dir or None, bench, args.benchmarks or None, wall_note=args.note)
    logging.getLogger("fedprune.sweep").info("[sweep] %s: %.1f min in all; wrote %s", grid.name, (time.perf_counter() - t0) / 60, path)
    print(path.read_text())
    failed = sum(r["status"] != "done" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    from fedprune.cli import run_reporting_errors  # noqa: E402

    sys.exit(run_reporting_errors(main, "sweep.py"))
