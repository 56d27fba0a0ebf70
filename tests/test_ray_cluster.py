"""Where the Simulation Engine runs: a local Ray instance or an existing Ray cluster (``federated.ray_address`` /
``RAY_ADDRESS``). No Ray is started here; the run on a real Ray head is in test_integration.py.
"""

from __future__ import annotations

import pytest

from fedprune.config import ConfigError, load_config
from fedprune.federated import ray_init_args


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
