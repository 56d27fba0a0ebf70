"""Integration tests: every test of the suite that starts Ray or Flower processes (marker ``integration``).

They live in this one file so that ``make test`` (pytest-xdist ``--dist loadfile``) runs them one after
another on one worker: several check by PID that none of their processes is left and must not see another
test's. Every process is stopped by PID or process group, never by ``ray stop`` or ``pkill`` by name.

* Flower's Simulation Engine on a local Ray instance: the same numbers as the in-process engine, with and
  without simulated client failures, and Ray shut down afterwards.
* The Simulation Engine on an existing Ray cluster (``federated.ray_address`` / ``RAY_ADDRESS``): the test
  starts its own Ray head on loopback (``ray start --head``, with a private ``--temp-dir``).
* ``flwr run .`` as README shows it: ``flwr`` starts a detached local SuperLink in simulation mode (Ray
  backend) under a private ``FLWR_HOME`` and free ports, and the test stops it by PID.
* The Deployment Engine: 1 ``flower-superlink`` and 3 ``flower-supernode`` processes on loopback (free
  ports, a private ``FLWR_HOME``), a tiny synthetic job submitted with ``flwr run``. Two SuperNodes declare
  their device profile in their node config, as real devices would.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from _procs import QUIET_ENV, ProcessGroup, alive, descendants, executable, free_ports, pids_matching, stop_pids, wait_for_port
from conftest import TINY

from fedprune.config import REPO_ROOT, load_config
from fedprune.federated import FederatedPruning, InProcessTransport, simulate
from fedprune.task import client_profile

#: The tiny job: no warm-up round and no static-BN round, so each SuperNode runs 5 ClientApp processes
#: (register, model delivery for scoring, importance, fine-tune, final evaluation). Every exchange costs
#: ~10 s of Flower's fixed polling (3 s at the SuperNode, 3 s at the ServerApp's grid) and a process start.
#: The BN-statistics message goes through the same ClientApp under the Simulation Engine (test_federated.py).
DEPLOY = [*TINY, "federated.warmup_rounds=0", "eval.static_bn=false"]
#: Profiles declared in the node config of partitions 0 and 1 (partition 2 keeps the seeded one).
DECLARED = {0: "microcontroller", 1: "edge_gpu"}
#: Experiment config of the job (relative to the app directory, as the ServerApp reads it).
CONFIG_FILE = "configs/quick.toml"


def _inprocess(overrides, declared: dict, config_file=None) -> dict:
    cfg = load_config(config_file, overrides)
    transport = InProcessTransport(3)
    for pid, profile in declared.items():
        transport.contexts[pid].node_config["profile"] = profile
    return FederatedPruning(cfg, transport, None).run()


# ------------------------------------------------------------ node-config profile (in-process, fast)
def test_declared_profile_replaces_the_seeded_assignment():
    cfg = load_config(None, TINY)
    seeded = [client_profile(cfg, i, 3) for i in range(3)]
    assert seeded[0] != "microcontroller"  # otherwise the test proves nothing
    res = _inprocess(TINY, {0: "microcontroller"})
    got = {c["partition_id"]: c["profile"] for c in res["clients"]}
    assert got == {0: "microcontroller", 1: seeded[1], 2: seeded[2]}
    counts = {p: sum(1 for v in got.values() if v == p) for p in set(got.values())}
    assert {p: v["clients"] for p, v in res["profiles"].items()} == counts


def test_unknown_declared_profile_is_a_clear_register_error():
    cfg = load_config(None, TINY)
    from fedprune.task import client_register

    with pytest.raises(ValueError, match=r"node config 'profile' = 'tablet' of partition 1 is not a known profile; allowed: \["):
        client_register(cfg, 1, 3, "tablet")


def _ray_pids() -> set[int]:
    """PIDs of every Ray GCS server and raylet on this machine."""
    return pids_matching("raylet|gcs_server")


def _run_config(tmp_path: Path, overrides: list[str], out_dir: Path) -> Path:
    """The job's run config (``[tool.flwr.app.config]`` keys) as a TOML file for ``flwr run --run-config``."""
    path = tmp_path / "run-config.toml"
    path.write_text(
        f'config-file = "{CONFIG_FILE}"\n'
        f"overrides = {json.dumps(shlex.join(overrides))}\n"
        f"out-dir = {json.dumps(str(out_dir))}\n"  # absolute: the SuperLink runs the app from its own copy
    )
    return path


def _flwr_setup(tmp_path: Path, names: tuple[str, ...]) -> tuple[dict, Path, dict]:
    """``(executables, FLWR_HOME, environment)`` of a ``flwr`` job: a private ``FLWR_HOME`` under ``tmp_path``
    and this venv's Flower executables first on PATH; skips the test when one of ``names`` is not installed."""
    tools = {name: executable(name) for name in (*names, "flwr")}
    missing = [n for n, p in tools.items() if p is None]
    if missing:
        pytest.skip(f"Flower executables not installed in this environment: {missing}")
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
           "PATH": f"{tools['flwr'].parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return tools, flwr_home, env


# ------------------------------------------------------------ integration: flwr run . (local simulation SuperLink)
@pytest.mark.integration
def test_flwr_run_on_the_local_simulation_superlink(tmp_path):
    tools, flwr_home, env = _flwr_setup(tmp_path, ("flower-superlink",))
    http_port, control_port = free_ports(2)  # not flwr's fixed 39091/39093: never join another SuperLink there
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port), FLWR_LOCAL_CONTROL_API_PORT=str(control_port))
    out_dir = tmp_path / "out"
    ray_before = _ray_pids()
    try:
        flwr = subprocess.run([str(tools["flwr"]), "run", str(REPO_ROOT), "--stream", "--federation-config",
                               "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=2",
                               "--run-config", str(_run_config(tmp_path, TINY, out_dir))],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        # flwr leaves the local SuperLink running (detached); every process of it names the private FLWR_HOME
        link = pids_matching(str(flwr_home))
        left = stop_pids(link | {d for p in link for d in descendants(p)})
    assert not left and not pids_matching(str(flwr_home)), f"processes still running after stop: {sorted(left)}"
    assert flwr.returncode == 0, f"flwr run failed:\n{flwr.stdout[-3000:]}\n{flwr.stderr[-3000:]}"
    assert link, "flwr run started no local SuperLink under FLWR_HOME"
    assert (out_dir / "results.json").is_file(), f"no results.json; flwr run output:\n{flwr.stdout[-3000:]}"
    res = json.loads((out_dir / "results.json").read_text())
    assert _ray_pids() - ray_before == set()  # the simulation shut its Ray instance down
    assert [r["phase"] for r in res["rounds"]] == ["warmup", "importance", "finetune", "bn_calibration"]
    expected = _inprocess(TINY, {}, REPO_ROOT / CONFIG_FILE)
    assert res["profiles"] == expected["profiles"]
    assert res["consensus"]["kept_channels"] == expected["consensus"]["kept_channels"]


# ------------------------------------------------------------ integration: SuperLink + 3 SuperNodes
@pytest.mark.integration
def test_deployment_engine_superlink_three_supernodes_flwr_run(tmp_path):
    tools, flwr_home, env = _flwr_setup(tmp_path, ("flower-superlink", "flower-supernode"))
    out_dir = tmp_path / "out"
    link_port, *node_ports = free_ports(4)
    group = ProcessGroup(tmp_path, env)
    t0 = time.monotonic()
    try:
        link = group.start("superlink", [tools["flower-superlink"], "--insecure", "--disable-runtime-dependency-installation",
                                         "--host", "127.0.0.1", "--port", link_port])
        wait_for_port(link_port, 60, link)
        for i in range(3):
            node_config = f"partition-id={i} num-partitions=3" + (f' profile="{DECLARED[i]}"' if i in DECLARED else "")
            group.start(f"supernode{i}", [tools["flower-supernode"], "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                          "--host", "127.0.0.1", "--port", node_ports[i], "--node-config", node_config])
        (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "local-deploy"\n\n[superlink.local-deploy]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
        run_config = _run_config(tmp_path, DEPLOY, out_dir)
        flwr = subprocess.run([str(tools["flwr"]), "run", str(REPO_ROOT), "local-deploy", "--stream", "--run-config", str(run_config)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
        group.all_pids()  # note the SuperExec children while they run
        assert flwr.returncode == 0, f"flwr run failed:\n{flwr.stdout[-3000:]}\n{flwr.stderr[-3000:]}"
        results = out_dir / "results.json"
        assert results.is_file(), f"no results.json; flwr run output:\n{flwr.stdout[-3000:]}\nSuperLink log:\n{group.log('superlink')}"
        res = json.loads(results.read_text())
    finally:
        left = group.stop()
    assert not left, f"processes still running after stop: {sorted(left)}"
    assert not pids_matching(f"127.0.0.1:{link_port}") | pids_matching(f"--port {link_port}"), "a SuperLink/SuperNode/SuperExec is left"
    elapsed = time.monotonic() - t0

    for key in ("config", "dense", "profiles", "rounds", "consensus", "clients", "totals", "summary"):
        assert key in res
    assert [r["phase"] for r in res["rounds"]] == ["importance", "finetune"]
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in res["rounds"])
    cfg = load_config(REPO_ROOT / CONFIG_FILE, DEPLOY)
    got = {c["partition_id"]: c["profile"] for c in res["clients"]}
    assert got == {0: DECLARED[0], 1: DECLARED[1], 2: client_profile(cfg, 2, 3)}
    assert set(res["profiles"]) == {"edge_gpu", "mobile_cpu", "microcontroller"}
    # Same numbers as the in-process engine with the same node configs.
    expected = _inprocess(DEPLOY, DECLARED, REPO_ROOT / CONFIG_FILE)
    assert res["profiles"] == expected["profiles"]
    assert res["consensus"]["kept_channels"] == expected["consensus"]["kept_channels"]
    print(f"deployment run: {elapsed:.1f} s")


# ------------------------------------------------------------ integration: Simulation Engine, local Ray
@pytest.mark.integration
def test_ray_simulation_matches_inprocess(tiny_run, tiny_cfg, tmp_path):
    """Flower's Simulation Engine (Ray backend) gives the same numbers as the in-process loop."""
    res, _ = tiny_run
    before = _ray_pids()
    ray_res = simulate(tiny_cfg, tmp_path, engine="ray")
    assert ray_res["profiles"] == res["profiles"]
    assert ray_res["rounds"][0]["bytes_down"] == res["rounds"][0]["bytes_down"]
    # The simulation shuts down the Ray instance it started: no new raylet/GCS is left running.
    assert _ray_pids() - before == set()


@pytest.mark.integration
def test_failures_under_the_simulation_engine_match_the_inprocess_run(tmp_path):
    """Flower's Simulation Engine (Ray) reports the same simulated crashes and drop-outs, and gives the same model."""
    fail_cfg = load_config(None, TINY + ["profiles.mobile_cpu.failure_prob=0.5", "profiles.microcontroller.failure_prob=0.5",
                                         "federated.min_replies_fraction=0.3"])
    ray_res = simulate(fail_cfg, tmp_path / "ray", engine="ray")
    local = simulate(fail_cfg, tmp_path / "local", engine="inprocess")

    def strip(rounds):
        return [{**{k: v for k, v in r.items() if k not in ("wall_s", "simulated_round_s", "failed_clients")},
                 "failed": [(f["partition"], f["profile"], f["attempt"]) for f in r["failed_clients"]]} for r in rounds]

    assert strip(ray_res["rounds"]) == strip(local["rounds"])
    assert sum(r["failures"] for r in ray_res["rounds"]) > 0
    reasons = [f["reason"] for r in ray_res["rounds"] for f in r["failed_clients"]]
    assert all("simulated crash" in x or "simulated drop" in x for x in reasons), reasons
    assert ray_res["profiles"] == local["profiles"]


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
