"""Scale on one machine: registered clients vs concurrently running ones.

    python simulation/bench_scale.py --data-dir ../shared/data/cifar10-subset

Flower's Simulation Engine (Ray backend) with 10, 100 and 1,000 registered
clients (SuperNodes), 10 sampled per round, on configs/quick.toml with IID
shards, 2 dense warm-up rounds, the importance round and 1 fine-tune round.
Measured per run: wall time of every round, of the registration (one message to
every client) and of the final evaluation, and the peak RSS of the whole
process tree (driver with the SuperLink and the clients' Contexts, Ray's GCS and
raylet, the Ray workers), sampled every 0.2 s from /proc. Then concurrency: the
same run with 2 workers (num_cpus_per_client = 1 on ray_num_cpus = 2) vs 1 worker
(num_cpus_per_client = 2). Writes benchmarks/scale.md and scale.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune import federated as fed_mod  # noqa: E402
from fedprune.config import config_from_dict, config_to_dict, load_config  # noqa: E402
from fedprune.metrics import process_tree_rss  # noqa: E402
from fedprune.reporting import BENCHMARKS_DIR, SHARED_SUBSET, write_json, write_text  # noqa: E402

log = logging.getLogger("bench_scale")


# ----------------------------------------------------------- process memory
class MemorySampler:
    """Peak RSS of this process and of its whole process tree, sampled by a background thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self._stop = interval, threading.Event()
        self.peak_driver = self.peak_tree = self.max_procs = 0
        self.load: list[float] = []

    def _sample(self) -> None:
        driver, tree, procs = process_tree_rss(os.getpid())
        self.peak_driver, self.peak_tree, self.max_procs = max(self.peak_driver, driver), max(self.peak_tree, tree), max(self.max_procs, procs)

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            self._sample()
            if k % 25 == 0:
                self.load.append(os.getloadavg()[0])
            k += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


@contextmanager
def phase_timers():
    """Wall time of the server's registration and final evaluation (the ServerApp runs in a thread of this process)."""
    cls = fed_mod.FederatedPruning
    orig_register, orig_final = cls.register, cls.final_results
    times: dict[str, float] = {}

    def register(self):
        t0 = time.perf_counter()
        orig_register(self)
        times["register_s"] = time.perf_counter() - t0

    def final_results(self, *a, **k):
        t0 = time.perf_counter()
        out = orig_final(self, *a, **k)
        times["final_s"] = time.perf_counter() - t0
        return out

    cls.register, cls.final_results = register, final_results
    try:
        yield times
    finally:
        cls.register, cls.final_results = orig_register, orig_final


# ----------------------------------------------------------------- the runs
def one_run(cfg, out: Path) -> dict:
    fed = cfg.federated
    log.info("%d clients, %d per round, %g CPUs per client on %d: running", fed.num_clients, fed.clients_per_round,
             fed.num_cpus_per_client, fed.ray_num_cpus)
    t0 = time.perf_counter()
    with phase_timers() as times, MemorySampler() as mem:
        res = fed_mod.simulate(cfg, out, engine="ray")
    wall = time.perf_counter() - t0
    rounds = [{"phase": r["phase"], "round": r["round"], "wall_s": r["wall_s"], "clients": r["clients"]} for r in res["rounds"]]
    row = {
        "clients": fed.num_clients,
        "per_round": fed.clients_per_round,
        "workers": int(fed.ray_num_cpus // fed.num_cpus_per_client),
        "num_cpus_per_client": fed.num_cpus_per_client,
        "train_images_per_client": sum(c["num_train"] for c in res["clients"]) / len(res["clients"]),
        "wall_s": wall,
        "register_s": times.get("register_s"),
        "final_s": times.get("final_s"),
        "final_eval_clients": sum(p.get("local_val_clients", 0) for p in res["profiles"].values()),
        "rounds": rounds,
        "peak_rss_tree_gib": mem.peak_tree / 2**30,
        "peak_rss_driver_gib": mem.peak_driver / 2**30,
        "max_processes": mem.max_procs,
        "load_avg": sum(mem.load) / max(1, len(mem.load)),
        "summary": res["summary"],
    }
    log.info("%d clients, %d worker(s): %.0f s (registration %.1f s, final %.1f s), rounds %s, peak RSS %.2f GiB (driver %.2f), load %.1f",
             fed.num_clients, row["workers"], wall, row["register_s"] or 0, row["final_s"] or 0,
             ", ".join(f"{r['phase']} {r['wall_s']:.1f}" for r in rounds), row["peak_rss_tree_gib"], row["peak_rss_driver_gib"], row["load_avg"])
    return row


def scale_config(base, clients: int, per_round: int, cpus_per_client: float, args, final_eval_clients: int | None = None):
    c = copy.deepcopy(base)
    c.federated = dataclasses.replace(c.federated, num_clients=clients, clients_per_round=min(per_round, clients),
                                      warmup_rounds=args.warmup_rounds, finetune_rounds=args.finetune_rounds,
                                      num_cpus_per_client=cpus_per_client, ray_num_cpus=2, eval_every=0)
    if final_eval_clients is not None:
        c.federated.final_eval_clients = final_eval_clients
    c.data = dataclasses.replace(c.data, partition="iid")
    c.eval = dataclasses.replace(c.eval, latency=False)
    return config_from_dict(config_to_dict(c), resolved=True)  # validated like any config (e.g. --clients 0 is an error)


# ---------------------------------------------------------------- reporting
def _round_walls(row: dict) -> dict:
    out: dict[str, list[float]] = {}
    for r in row["rounds"]:
        out.setdefault(r["phase"], []).append(r["wall_s"])
    return out


def render(state: dict) -> str:
    args = state["args"]
    scale, conc = state.get("scale", []), state.get("concurrency", [])
    every = scale + conc
    n_rounds = f"{args['warmup_rounds']} dense warm-up rounds + importance round + {args['finetune_rounds']} fine-tune round(s)"
    lines = [
        "# Scale on one machine",
        "",
        f"Generated by `python simulation/bench_scale.py` on {state['host']}. Flower {state['flwr']} Simulation Engine (Ray "
        f"{state['ray']} backend), `configs/quick.toml` (seed_cnn, Taylor importance, 3 profiles) with IID shards of the CIFAR-10 subset "
        f"({state['images'][0]:,} train / {state['images'][1]:,} test images, so a client holds ~4,068 / N images), "
        f"{args['per_round']} clients sampled per round, {n_rounds}, latency off. "
        f"The final local evaluation uses a seeded sample of at most `federated.final_eval_clients` = "
        f"{state['final_eval_clients']} clients (plus one per profile it misses). Peak RSS is the sum over the whole process tree "
        "(driver with the SuperLink and every node's Context, Ray GCS and raylet, the Ray workers), sampled every 0.2 s from /proc.",
        "",
        f"**The machine was shared** while this ran (other benchmarks and tests; the runs were niced): mean 1-minute load average "
        f"{min(r['load_avg'] for r in every):.1f}-{max(r['load_avg'] for r in every):.1f} on {os.cpu_count()} cores. "
        "Wall times are as measured and inflated by that load; compare them within a table, not with other files.",
        "",
        "## Registered clients (2 workers, 10 sampled per round)",
        "",
        "| registered clients | train images per client | registration (s) | warm-up round 1, cold (s) | warm-up round (s) | importance round (s) | fine-tune round (s) | final evaluation (s, clients) | run wall incl. Ray start (s) | peak RSS, process tree (GiB) | peak RSS, driver (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, d=1):
        return "–" if v is None else f"{v:.{d}f}"

    def round_cells(r) -> str:
        """Warm-up round 1 (cold), mean later warm-up round, importance round, mean fine-tune round (s)."""
        w = _round_walls(r)
        warm, fine = w.get("warmup", []), w.get("finetune", [])
        return (f"{f(warm[0] if warm else None)} | {f(sum(warm[1:]) / len(warm[1:]) if len(warm) > 1 else None)} | "
                f"{f((w.get('importance') or [None])[0])} | {f(sum(fine) / len(fine) if fine else None)}")

    for r in scale:
        lines.append(f"| {r['clients']:,} | {r['train_images_per_client']:.1f} | {f(r['register_s'])} | {round_cells(r)} | "
                     f"{f(r['final_s'])} ({r['final_eval_clients']}) | {r['wall_s']:.0f} | {r['peak_rss_tree_gib']:.2f} | {r['peak_rss_driver_gib']:.2f} |")
    lo, hi = (scale[0], scale[-1]) if scale else (conc[0], conc[0])
    lines += [
        "",
        f"- Peak RSS from {lo['clients']:,} to {hi['clients']:,} registered clients: {lo['peak_rss_tree_gib']:.2f} → "
        f"{hi['peak_rss_tree_gib']:.2f} GiB ({100 * (hi['peak_rss_tree_gib'] / lo['peak_rss_tree_gib'] - 1):+.0f}%), driver "
        f"{lo['peak_rss_driver_gib']:.2f} → {hi['peak_rss_driver_gib']:.2f} GiB. The server keeps per client only its registration "
        "record (partition id, profile, shard sizes, label histogram); models go out to the sampled clients only, and the "
        "state a client keeps between rounds (the dense model cached for the importance round) lives in its Flower `Context` "
        "and is dropped once used.",
        "- Registration sends one small message to every client, so it is the one step that grows with the number registered "
        "(it also includes the workers' cold start: importing torch, loading the data, partitioning it). "
        "Rounds touch only the sampled clients: their wall time reflects the shard size (smaller shards with more clients), not "
        "the number registered.",
        "",
        f"## Concurrency ({conc[0]['clients']} clients, all sampled every round)" if conc and conc[0]["per_round"] >= conc[0]["clients"]
        else f"## Concurrency ({conc[0]['clients'] if conc else '-'} clients, {args['per_round']} sampled per round)",
        "",
        "| Ray workers (CPUs per client on 2) | warm-up round 1, cold (s) | warm-up round (s) | importance round (s) | fine-tune round (s) | run wall incl. Ray start (s) | peak RSS, process tree (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in conc:
        lines.append(f"| {r['workers']} ({r['num_cpus_per_client']:g}) | {round_cells(r)} | {r['wall_s']:.0f} | {r['peak_rss_tree_gib']:.2f} |")
    if len(conc) == 2:
        a, b = sorted(conc, key=lambda r: r["workers"])
        wa, wb = _round_walls(a).get("warmup", [])[1:], _round_walls(b).get("warmup", [])[1:]
        if wa and wb:
            lines += ["", f"- Steady warm-up round: {b['workers']} workers take {sum(wb) / len(wb):.1f} s vs {sum(wa) / len(wa):.1f} s with "
                          f"{a['workers']} (speed-up {sum(wa) / len(wa) / (sum(wb) / len(wb)):.2f}x); memory {a['peak_rss_tree_gib']:.2f} → "
                          f"{b['peak_rss_tree_gib']:.2f} GiB: each extra worker process holds its own copy of torch, the data and the models."]
            if sum(wa) / len(wa) / (sum(wb) / len(wb)) < 1.3:
                lines += [f"- No speed-up here because the cores were not free: with a load average of {a['load_avg']:.1f}-{b['load_avg']:.1f} "
                          "on 2 cores from other jobs (benchmarks, test suites), the niced workers got about one core between them. "
                          "The comparison shows the memory cost of a second worker. Its speed-up can only be measured on an idle machine."]
    full = state.get("full_final_eval")
    if full:
        same = next((r for r in scale if r["clients"] == full["clients"]), None)
        lines += ["", f"## Final evaluation on every client ({full['clients']:,} registered)", "",
                  f"With `federated.final_eval_clients = 0` all {full['final_eval_clients']:,} clients evaluate at the end: "
                  f"{f(full['final_s'])} s instead of {f(same['final_s']) if same else '–'} s with the sample of "
                  f"{same['final_eval_clients'] if same else '–'}; peak RSS {full['peak_rss_tree_gib']:.2f} GiB (driver "
                  f"{full['peak_rss_driver_gib']:.2f}) vs {same['peak_rss_tree_gib']:.2f} GiB, since evaluations go out in batches of "
                  f"`clients_per_round` (before this change all {full['clients']:,} evaluation messages, each with a model, were "
                  "queued at once)."]
    lines += ["", "Raw numbers: `scale.json`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(SHARED_SUBSET), help="folder holding cifar-10-batches-py")
    parser.add_argument("--config", default=str(ROOT / "configs/quick.toml"))
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000], help="registered clients per run")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--warmup-rounds", type=int, default=2)
    parser.add_argument("--finetune-rounds", type=int, default=1)
    parser.add_argument("--concurrency-clients", type=int, default=10, help="registered clients of the 1-vs-2-worker comparison")
    parser.add_argument("--full-final-eval", action="store_true",
                        help="also run the largest client count with federated.final_eval_clients = 0 (every client evaluates at the end)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["scale", "concurrency"])
    parser.add_argument("--runs-dir", default=str(ROOT / "runs/bench_scale"))
    parser.add_argument("--out", default=str(BENCHMARKS_DIR), help="where scale.md / scale.json go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import json
    import platform

    import flwr
    import ray

    from fedprune.task import load_data

    base = load_config(args.config, {"data": {"data_dir": args.data_dir}})
    runs, out = Path(args.runs_dir), Path(args.out)
    state_path = out / "scale.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    train, test = load_data(base)
    state.update({"host": f"{platform.node() or 'this machine'} ({os.cpu_count()} cores)", "flwr": flwr.__version__, "ray": ray.__version__,
                  "images": [len(train), len(test)], "final_eval_clients": base.federated.final_eval_clients, "args": vars(args)})
    results: dict[tuple, dict] = {}

    def run(clients: int, cpus: float) -> dict:
        key = (clients, cpus)
        if key not in results:
            results[key] = one_run(scale_config(base, clients, args.per_round, cpus, args), runs / f"n{clients}_cpus{cpus:g}")
        return results[key]

    if "concurrency" not in args.skip:  # first: the 2-worker run is also the first row of the scale table
        state["concurrency"] = [run(args.concurrency_clients, 2.0), run(args.concurrency_clients, 1.0)]
    if "scale" not in args.skip:
        state["scale"] = [run(n, 1.0) for n in args.clients]
    if args.full_final_eval:
        n = max(args.clients)
        state["full_final_eval"] = one_run(scale_config(base, n, args.per_round, 1.0, args, final_eval_clients=0), runs / f"n{n}_cpus1_alleval")
    write_json(state_path, state)
    write_text(out / "scale.md", render(state))
    print((out / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    from fedprune.cli import run_reporting_errors  # noqa: E402

    sys.exit(run_reporting_errors(main, "bench_scale.py"))
