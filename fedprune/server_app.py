"""Flower ServerApp for ``flwr run .`` and the Deployment Engine.

Reads ``[tool.flwr.app.config]`` from pyproject.toml (or ``--run-config``):

* ``config-file``  experiment TOML, relative to the app directory
* ``overrides``    space-separated ``key=value`` overrides (``--set`` syntax)
* ``out-dir``      where results go (relative paths: under the app directory)
* ``mask-source``  consensus | local | random | none (dense FedAvg baseline)

and runs :class:`fedprune.federated.FederatedPruning` over the Grid. The
ClientApp is :mod:`fedprune.client_app`; ``fedprune simulate`` uses both
apps unchanged.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprune.config import REPO_ROOT, load_config
from fedprune.federated import FederatedPruning, GridTransport

app = ServerApp()
log = logging.getLogger("fedprune.server")


def _app_path(value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(_app_path(str(rc.get("config-file", "configs/quick.toml"))), shlex.split(str(rc.get("overrides", ""))))
    out_dir = _app_path(str(rc.get("out-dir", "runs/flwr")))
    log.info("fedprune ServerApp: %d supernodes connected, results to %s", len(grid.get_node_ids()), out_dir)
    FederatedPruning(cfg, GridTransport(grid), out_dir, str(rc.get("mask-source", "consensus"))).run()
