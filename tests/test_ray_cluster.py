"""The Simulation Engine on an existing Ray cluster (``federated.ray_address`` / ``RAY_ADDRESS``).

The integration test starts its own Ray head on loopback (``ray start --head``, with a private
``--temp-dir``), runs a tiny simulation on it and stops the head's processes by PID. It never
runs ``ray stop``, which would stop every Ray instance on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from _procs import QUIET_ENV, alive, executable, free_ports, pids_matching, stop_pids
from conftest import TINY

from fedprune.config import ConfigError, load_config
from fedprune.federated import ray_init_args, simulate


# ------------------------------------------------------------ address precedence (no Ray needed)
def test_ray_init_args_local_instance_by_default(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fed = load_config(None, ["federated.ray_num_cpus=3"]).federated
    args = ray_init_args(fed)
    # "local": a new instance even if `ray start` left a cluster on this machine
    assert args["address"] == "local" and args["num_cpus"] == 3


def test_ray_address_from_config_or_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    fed = load_config(None, []).federated
    assert ray_init_args(fed)["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in ray_init_args(fed)  # Ray refuses num_cpus when joining a cluster
    fed = load_config(None, ["federated.ray_address='127.0.0.1:7000'"]).federated
    assert ray_init_args(fed)["address"] == "127.0.0.1:7000"  # the config key wins over RAY_ADDRESS
    assert "num_cpus" not in ray_init_args(fed)
    fed = load_config(None, ["federated.ray_address='local'"]).federated
    assert ray_init_args(fed)["address"] == "local"  # forces a local instance despite RAY_ADDRESS


def test_ray_address_must_be_a_string():
    with pytest.raises(ConfigError, match="federated.ray_address"):
        load_config(None, ["federated.ray_address=6379"])


# ------------------------------------------------------------ integration: external Ray head
@pytest.fixture
def ray_head():
    """A Ray head on this machine with 2 CPUs, private to this test; yields (address, temp dir, PIDs)."""
    ray = executable("ray")
    if ray is None:
        pytest.skip("the `ray` executable is not installed in this environment")
    # Short private temp dir: Ray's unix socket paths must stay under ~107 characters, and
    # `ray start` writes its address file here instead of /tmp/ray/ray_current_cluster.
    temp_dir = tempfile.mkdtemp(prefix="fp-ray-", dir="/tmp")
    port, client_port, agent_port = free_ports(3)
    env = {**os.environ, **QUIET_ENV}
    env.pop("RAY_ADDRESS", None)
    # Free ports for the fixed-port extras too (Ray client server 10001, dashboard agent 52365), so a
    # Ray instance someone else runs here cannot collide. Ray replaces 127.0.0.1 as node IP by the
    # machine's address and its GCS listens on all interfaces; the test connects through 127.0.0.1.
    cmd = [str(ray), "start", "--head", "--port", str(port), "--ray-client-server-port", str(client_port),
           "--dashboard-agent-listen-port", str(agent_port), "--num-cpus", "2",
           "--disable-usage-stats", "--include-dashboard=false", "--temp-dir", temp_dir]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # slow under load
        pids = pids_matching(temp_dir)  # every process of this head names its temp dir
        if res.returncode != 0:
            pytest.fail(f"`ray start --head` failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        yield f"127.0.0.1:{port}", temp_dir, pids
    finally:
        left = set()
        for _ in range(3):  # workers the raylet started during the test show up in a second pass
            pids = pids_matching(temp_dir)
            if not pids:
                break
            left = stop_pids(pids, grace=5.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left and not pids_matching(temp_dir), f"Ray head processes still running: {sorted(left)}"


@pytest.mark.integration
def test_simulation_runs_on_an_existing_ray_cluster(ray_head, tmp_path, monkeypatch):
    """``federated.ray_address`` joins the given cluster: same numbers as in-process, cluster left running."""
    address, temp_dir, head_pids = ray_head
    core = {p: _comm(p) for p in head_pids if _comm(p) in ("gcs_server", "raylet")}
    assert sorted(core.values()) == ["gcs_server", "raylet"], core
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, [*TINY, f"federated.ray_address='{address}'"])  # the address travels in the config record
    expected = simulate(cfg, tmp_path / "inprocess", engine="inprocess")

    t0 = time.monotonic()
    res = simulate(cfg, tmp_path / "cluster", engine="ray")
    assert res["profiles"] == expected["profiles"]
    assert res["rounds"][0]["bytes_down"] == expected["rounds"][0]["bytes_down"]

    # The run used this cluster: its driver (this process) logged into the head's session ...
    logs = Path(temp_dir) / "session_latest" / "logs"
    assert list(logs.glob(f"python-core-driver-*_{os.getpid()}.log")), sorted(p.name for p in logs.iterdir())
    # ... and its client actors ran there as workers of the head.
    assert any("ClientAppActor" in p.read_text(errors="replace") for p in logs.glob("worker-*.out")), "no ClientAppActor worker on the head"
    # Flower's ray.shutdown() only disconnected: the head's GCS and raylet still run.
    assert all(alive(p) for p in core), "the run stopped the Ray head"
    assert time.monotonic() - t0 < 300


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
