"""Tests for fedprune.config (TOML loading and validation) and the CLI's error path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedprune import cli
from fedprune.config import (
    DEFAULT_PROFILES_FILE,
    PROFILE_NAMES,
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    load_profiles,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.toml") if p.name != "profiles.toml")


# ------------------------------------------------------------- good configs
def test_defaults_load() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.seed == 0 and cfg.model.name == "seed_cnn" and cfg.pruning.sparsity == 0.5
    assert set(cfg.profiles) == set(PROFILE_NAMES)
    assert sum(cfg.federated.proportions.values()) == pytest.approx(1.0)
    assert cfg.profiles["microcontroller"].sparsity > cfg.profiles["edge_gpu"].sparsity


def test_repo_has_experiment_configs() -> None:
    assert {p.name for p in EXPERIMENT_CONFIGS} >= {"centralized.toml", "cifar10.toml", "quick.toml"}


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_repo_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.name in ("seed_cnn", "resnet20", "mobilenetv2")
    # A resolved config round-trips through config_to_dict.
    again = config_from_dict(config_to_dict(cfg), resolved=True)
    assert config_to_dict(again) == config_to_dict(cfg)


def test_profiles_file_loads() -> None:
    profiles = load_profiles(DEFAULT_PROFILES_FILE)
    assert set(profiles) == set(PROFILE_NAMES)
    assert load_profiles(None) == profiles
    for p in profiles.values():
        assert 0.0 <= p.sparsity < 1.0 and p.compute_speed > 0 and p.bandwidth_mbps > 0


def test_overrides_and_profile_overrides(tmp_path: Path) -> None:
    cfg = load_config(None, ["pruning.sparsity=0.7", "federated.num_clients=20", "model.name=resnet20", 'data.dataset="synthetic"'])
    assert cfg.pruning.sparsity == 0.7 and cfg.federated.num_clients == 20
    assert cfg.model.name == "resnet20" and cfg.data.dataset == "synthetic"  # bare string falls back to str
    cfg = load_config(None, {"profiles": {"edge_gpu": {"sparsity": 0.1}}})
    assert cfg.profiles["edge_gpu"].sparsity == 0.1
    assert cfg.profiles["edge_gpu"].local_epochs == load_profiles()["edge_gpu"].local_epochs  # other fields kept
    assert parse_overrides(["a.b=1", "a.c=x y", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x y"}, "d": [1, 2]}
    # allocation=sensitivity switches client sensitivity on
    assert load_config(None, ["pruning.allocation=sensitivity"]).federated.sensitivity is True
    # data_dir that exists is accepted
    assert load_config(None, [f'data.data_dir="{tmp_path}"']).data.data_dir == str(tmp_path)


# -------------------------------------------------------------- bad configs
#: (id, TOML text, fragments the error message must contain: key and bad value)
BAD_CONFIGS = [
    ("unknown_top_level_key", "colour = 'red'\n", ["'colour'"]),
    ("unknown_nested_key", "[model]\ndepth = 3\n", ["'model.depth'"]),
    ("unknown_table", "[optimizer]\nlr = 0.1\n", ["'optimizer'"]),
    ("int_as_string", "[train]\nepochs = 'five'\n", ["'train.epochs'", "'five'", "integer"]),
    ("int_as_float", "[train]\nbatch_size = 2.5\n", ["'train.batch_size'", "2.5", "integer"]),
    ("int_as_bool", "seed = true\n", ["'seed'", "True", "integer"]),
    ("str_as_int", "[model]\nname = 3\n", ["'model.name'", "3", "string"]),
    ("bool_as_string", "[train]\ncosine = 'yes'\n", ["'train.cosine'", "'yes'", "true or false"]),
    ("bool_as_int", "[eval]\nlatency = 1\n", ["'eval.latency'", "1", "true or false"]),
    ("float_as_string", "[train]\nlr = '0.1'\n", ["'train.lr'", "'0.1'", "number"]),
    ("float_nan", "[train]\nlr = nan\n", ["'train.lr'", "nan"]),
    ("table_as_scalar", "model = 3\n", ["'model'", "3", "table"]),
    ("list_as_string", "[pruning]\nsensitivity_ratios = '0.5'\n", ["'pruning.sensitivity_ratios'", "'0.5'", "list"]),
    ("sparsity_one", "[pruning]\nsparsity = 1.0\n", ["'pruning.sparsity'", "1.0", "range"]),
    ("sparsity_negative", "[pruning]\nsparsity = -0.1\n", ["'pruning.sparsity'", "-0.1", "range"]),
    ("lr_zero", "[train]\nlr = 0.0\n", ["'train.lr'", "0.0", "range"]),
    ("num_clients_zero", "[federated]\nnum_clients = 0\n", ["'federated.num_clients'", "0", "range"]),
    ("proportions_sum", "[federated]\nproportions = { edge_gpu = 0.5, mobile_cpu = 0.4, microcontroller = 0.3 }\n",
     ["'federated.proportions'", "1.2", "sum to 1"]),
    ("proportions_unknown_profile", "[federated]\nproportions = { edge_gpu = 0.5, smartwatch = 0.5 }\n",
     ["'federated.proportions.smartwatch'"]),
    ("proportions_negative", "[federated]\nproportions = { edge_gpu = 1.2, mobile_cpu = -0.2 }\n",
     ["'federated.proportions.mobile_cpu'", "-0.2"]),
    ("proportions_not_number", "[federated]\nproportions = { edge_gpu = 'all' }\n", ["'federated.proportions.edge_gpu'", "'all'"]),
    ("more_profiles_than_clients", "[federated]\nnum_clients = 2\n", ["'federated.num_clients'", "2", "3 profiles"]),
    ("unknown_model", "[model]\nname = 'vgg16'\n", ["'model.name'", "'vgg16'", "resnet20"]),
    ("unknown_criterion", "[pruning]\ncriterion = 'random'\n", ["'pruning.criterion'", "'random'", "taylor"]),
    ("unknown_aggregation", "[federated]\naggregation = 'krum'\n", ["'federated.aggregation'", "'krum'", "median"]),
    ("unknown_allocation", "[pruning]\nallocation = 'greedy'\n", ["'pruning.allocation'", "'greedy'", "uniform"]),
    ("unknown_schedule", "[pruning]\nschedule = 'magic'\n", ["'pruning.schedule'", "'magic'", "one_shot"]),
    ("unknown_dataset", "[data]\ndataset = 'mnist'\n", ["'data.dataset'", "'mnist'"]),
    ("missing_data_dir", "[data]\ndata_dir = '/nonexistent/fedprune-data-xyz'\n", ["'data.data_dir'", "/nonexistent/fedprune-data-xyz"]),
    ("sensitivity_ratio_above_one", "[pruning]\nsensitivity_ratios = [0.2, 1.5]\n", ["'pruning.sensitivity_ratios'", "1.5"]),
    ("sensitivity_ratio_zero", "[pruning]\nsensitivity_ratios = [0.0]\n", ["'pruning.sensitivity_ratios'", "0.0"]),
    ("sensitivity_ratio_string", "[pruning]\nsensitivity_ratios = ['a']\n", ["'pruning.sensitivity_ratios'", "'a'"]),
    ("sensitivity_ratios_empty", "[pruning]\nsensitivity_ratios = []\n", ["'pruning.sensitivity_ratios'", "[]"]),
    ("clients_per_round_too_many", "[federated]\nnum_clients = 4\nclients_per_round = 5\n",
     ["'federated.clients_per_round'", "5", "num_clients = 4"]),
    ("unknown_profile_override", "[profiles.smartwatch]\nsparsity = 0.9\n", ["'profiles.smartwatch'"]),
    ("profile_override_bad_value", "[profiles.edge_gpu]\nsparsity = 1.5\n", ["'profiles.edge_gpu.sparsity'", "1.5"]),
    ("profile_override_unknown_key", "[profiles.edge_gpu]\ncores = 4\n", ["'profiles.edge_gpu.cores'"]),
    ("profile_override_not_table", "[profiles]\nedge_gpu = 3\n", ["'profiles.edge_gpu'", "3", "table"]),
    ("profiles_not_table", "profiles = 3\n", ["'profiles'", "3"]),
    ("missing_profiles_file", "[federated]\nprofiles_file = 'no-such-profiles.toml'\n", ["no-such-profiles.toml", "does not exist"]),
    ("bad_toml_syntax", "seed = = 1\n", ["bad.toml", "not valid TOML"]),
]


@pytest.mark.parametrize("text,fragments", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_raises_config_error(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_bad_config_table_is_large_enough() -> None:
    assert len(BAD_CONFIGS) >= 15


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["pruning.sparsity"], ["'pruning.sparsity'", "key=value"]),
        (["pruning.sparsity=1.0"], ["'pruning.sparsity'", "1.0"]),
        (["train.lr=-1"], ["'train.lr'", "-1"]),
        (["model.width=2"], ["'model.width'"]),
        (["seed=1", "seed.x=2"], ["'seed.x=2'", "'seed'"]),  # a key overridden as value and as table
        (["profiles.edge_gpu=3"], ["'profiles.edge_gpu'", "3"]),
    ],
    ids=["no_equals", "sparsity", "negative_lr", "unknown_key", "value_then_table", "profile_not_table"],
)
def test_bad_overrides_raise_config_error(overrides, fragments) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


# ---------------------------------------------------------------------- CLI
def _single_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedprune: error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "command,text,extra,fragment",
    [
        ("prune", "[model]\nname = 'vgg16'\n", [], "'vgg16'"),
        ("prune", "[pruning]\nsparsity = 1.0\n", [], "'pruning.sparsity'"),
        ("prune", "seed = = 1\n", [], "not valid TOML"),
        ("prune", "seed = 0\n", ["--set", "profiles.edge_gpu=3"], "'profiles.edge_gpu'"),
        ("prune", "seed = 0\n", ["--set", "federated.num_clients"], "key=value"),
        ("train", "[federated]\nnum_clients = 2\n", [], "'federated.num_clients'"),
        ("train", "seed = 0\n", ["--data-dir", "/nonexistent/fedprune-xyz"], "/nonexistent/fedprune-xyz"),
    ],
)
def test_cli_bad_config_exit_code_2(tmp_path: Path, capsys, command, text, extra, fragment) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    argv = [command, "--config", str(path), *extra]
    if command == "prune":
        argv += ["--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    line = _single_error_line(captured.err)
    assert fragment in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,fragments", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_every_bad_config_exits_2_from_simulate(tmp_path: Path, capsys, text: str, fragments: list[str]) -> None:
    """The whole table through the CLI: exit code 2, one line naming key and value, no traceback, no output dir."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert cli.main(["simulate", "--config", str(path), "--out", str(tmp_path / "out"), "--engine", "inprocess"]) == 2
    line = _single_error_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "out").exists()


def test_console_script_bad_config(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "fedprune"
    if not script.exists():
        pytest.skip(f"console script not installed at {script}")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pruning]\ncriterion = 'coin_flip'\n")
    proc = subprocess.run(
        [str(script), "prune", "--config", str(bad), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = _single_error_line(proc.stderr)
    assert "'pruning.criterion'" in line and "'coin_flip'" in line


def test_config_without_drops_sections_keys_and_profile_keys() -> None:
    from fedprune.config import config_without

    d = config_to_dict(load_config(None))
    out = config_without(d, {"federated": None, "eval": ("static_bn",)}, ("sparsity",))
    assert "federated" not in out and "static_bn" not in out["eval"] and "latency" in out["eval"]
    assert all("sparsity" not in p and "budgets" in p for p in out["profiles"].values())
    assert d == config_to_dict(load_config(None))  # the input is left as it was


def test_centralized_config_ignores_what_centralized_runs_never_read(tmp_path: Path) -> None:
    """A cached centralized result (bench_hardware) stays valid when only federated or dynamic settings change."""
    from fedprune.centralized import centralized_config

    base = centralized_config(config_to_dict(load_config(None)))
    other = load_config(None, ["federated.num_clients=20", 'dynamic.method="widths"', "eval.static_bn=false"])
    assert centralized_config(config_to_dict(other)) == base
    assert centralized_config(config_to_dict(load_config(None, ["pruning.sparsity=0.7"]))) != base
    assert centralized_config(config_to_dict(load_config(None, ["eval.latency_repeats=3"]))) != base
    (tmp_path / "sub").mkdir()
    same_dir = [centralized_config(config_to_dict(load_config(None, [f'data.data_dir="{d}"']))) for d in (tmp_path, tmp_path / "sub" / "..")]
    assert same_dir[0] == same_dir[1]
