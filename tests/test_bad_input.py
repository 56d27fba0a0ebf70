"""Bad input from the command line and the scripts: one clear line naming the value and what is allowed, exit
code 2, before any work, and nothing lost or half-written. Nothing here trains."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedprune import cli
from fedprune.config import ConfigError, load_config

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _tiny_toml(tmp_path: Path) -> Path:
    """TINY as a config file."""
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(f"{k} = {v}" for k, v in (o.split("=", 1) for o in TINY if not o.startswith("federated.proportions")))
                    + "\n[federated.proportions]\nedge_gpu = 0.34\nmobile_cpu = 0.33\nmicrocontroller = 0.33\n")
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_out_that_cannot_be_a_directory_fails_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    import fedprune.federated as federated

    monkeypatch.setattr(federated, "simulate", lambda *a, **k: pytest.fail("nothing may run"))
    monkeypatch.setattr("fedprune.centralized.run_centralized", lambda *a, **k: pytest.fail("nothing may run"))
    cfg = _tiny_toml(tmp_path)
    (tmp_path / "a_file").write_text("keep")
    for command in ("simulate", "prune"):
        for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
            assert cli.main([command, "--config", str(cfg), "--out", str(out)]) == 2
            line = _error_line(capsys)
            assert "--out" in line and "a_file" in line
    assert (tmp_path / "a_file").read_text() == "keep"


@pytest.mark.skipif(not Path("/proc/self").is_dir() or os.geteuid() != 0, reason="needs Linux /proc and root (others fail the permission bits first)")
def test_out_where_no_file_can_be_created_fails_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    """/proc passes a permission-bit check for root but takes no new files: the probe catches it."""
    import fedprune.federated as federated

    monkeypatch.setattr(federated, "simulate", lambda *a, **k: pytest.fail("nothing may run"))
    assert cli.main(["simulate", "--config", str(_tiny_toml(tmp_path)), "--out", "/proc/fedprune-out"]) == 2
    line = _error_line(capsys)
    assert "--out '/proc/fedprune-out' is not writable: no file can be created in '/proc'" in line
    assert not list(tmp_path.glob(".fedprune-probe-*"))
    from fedprune.reporting import check_out_dir

    assert check_out_dir(tmp_path / "new" / "sub") == tmp_path / "new" / "sub"
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".fedprune-probe-*"))


def test_a_fresh_run_does_not_delete_an_unfinished_runs_checkpoint(tmp_path, capsys, monkeypatch) -> None:
    import fedprune.federated as federated

    monkeypatch.setattr(federated, "simulate", lambda *a, **k: pytest.fail("nothing may run"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"an unfinished run")
    assert cli.main(["simulate", "--config", str(_tiny_toml(tmp_path)), "--out", str(run)]) == 2
    line = _error_line(capsys)
    assert "unfinished run" in line and f"--resume '{run}'" in line
    assert (run / "checkpoint.pt").read_bytes() == b"an unfinished run"
    # results.json of an earlier, finished run does not make a later, killed run's newer checkpoint finished
    (run / "results.json").write_text("{}")
    os.utime(run / "results.json", (1, 1))
    assert cli.main(["simulate", "--config", str(_tiny_toml(tmp_path)), "--out", str(run)]) == 2
    assert "unfinished run" in _error_line(capsys)


def test_flag_values_are_taken_as_given(tmp_path) -> None:
    """--data-dir is a path, not TOML: quotes, backslashes and escapes stay as they are; --set can still set it."""
    parser = cli.build_parser()
    for name in ('q"uote', "back\\dir", "tab\\tdir"):
        weird = str(tmp_path / name)
        Path(weird).mkdir()
        args = parser.parse_args(["train", "--dataset", "synthetic", "--data-dir", weird, "--seed", "3"])
        cfg = cli._load(args)
        assert cfg.data.data_dir == weird and cfg.seed == 3 and cfg.data.dataset == "synthetic"
    args = parser.parse_args(["train", "--set", f"data.data_dir={tmp_path}", "seed=1", "--seed", "4"])
    cfg = cli._load(args)
    assert cfg.data.data_dir == str(tmp_path) and cfg.seed == 4  # flags win over --set
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--epochs", "-1"])


def test_corrupt_cifar_files_name_the_file(tmp_path, capsys) -> None:
    from fedprune.data import InvalidDataError, read_cifar10_batches

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (root / name).write_bytes(pickle.dumps(good))
    cases = [b"", b"garbage, not a pickle", pickle.dumps([1, 2, 3]), pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
             pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})]
    for content in cases:
        (root / "test_batch").write_bytes(content)
        with pytest.raises(InvalidDataError, match="test_batch"):
            read_cifar10_batches(root)
    assert cli.main(["train", "--data-dir", str(tmp_path), "--epochs", "0"]) == 2
    assert "test_batch" in _error_line(capsys)


def test_config_files_that_are_not_toml_text(tmp_path) -> None:
    (tmp_path / "latin1.toml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match=r"'.*latin1.toml' is not UTF-8 text"):
        load_config(tmp_path / "latin1.toml")
    with pytest.raises(ConfigError, match="is a directory; give a .toml file"):
        load_config(tmp_path)


def test_pruning_that_cannot_prune_is_an_error() -> None:
    from fedprune.allocation import check_min_channels
    from fedprune.task import model_groups

    cfg = load_config(None, TINY + ["pruning.min_channels=100000"])
    with pytest.raises(ConfigError, match=r"'pruning.min_channels' = 100000 keeps every channel.*allowed: below \d+"):
        check_min_channels(model_groups(cfg), cfg.pruning.min_channels)


def test_a_proportions_override_that_does_not_sum_to_one_shows_the_merged_table() -> None:
    with pytest.raises(ConfigError, match=r"'federated.proportions' = \{edge_gpu=1, mobile_cpu=0.4, microcontroller=0.3\} sums to 1.7;"
                                          r".*merges into the config's table: give every profile"):
        load_config(ROOT / "configs/quick.toml", ["federated.proportions={edge_gpu=1.0}"])
    cfg = load_config(ROOT / "configs/quick.toml", ["federated.proportions={edge_gpu=1.0, mobile_cpu=0, microcontroller=0}"])
    assert cfg.federated.proportions["edge_gpu"] == 1.0


def test_prune_checks_its_budget_before_training(monkeypatch) -> None:
    import fedprune.centralized as centralized

    monkeypatch.setattr(centralized, "train_dense", lambda *a, **k: pytest.fail("trained before checking the budget"))
    cfg = load_config(None, TINY + ["pruning.allocation='budget'"])
    with pytest.raises(ConfigError, match="needs pruning.budget_profile"):
        centralized.run_centralized(cfg)


def test_checkpoints_missing_keys_and_warm_start_messages(tmp_path) -> None:
    from fedprune.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": FORMAT_VERSION}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"cannot resume: .* is not a complete checkpoint \(it lacks config"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match=r"cannot warm-start: run directory .* does not exist"):
        load_checkpoint(tmp_path / "nowhere", "warm-start")


def test_scripts_report_user_errors_in_one_line(tmp_path, capsys) -> None:
    import importlib.util

    def script(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "simulation" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    for name, argv, fragment in [
        ("bench_hardware", ["--render-only", "--out", str(tmp_path / "none")], "--render-only reads"),
        ("bench_dynamic", ["--render-only", "--out", str(tmp_path / "none")], "--render-only reads"),
        ("centralized_table", ["--latency-only", "--out", str(tmp_path / "none")], "--latency-only reads"),
        ("bench_hardware", ["--criterion", "l3", "--out", str(tmp_path / "b"), "--runs-dir", str(tmp_path / "r")], "'l3'"),
    ]:
        main = script(name).main
        assert cli.run_reporting_errors(lambda: main(argv), f"{name}.py") == 2
        line = _error_line(capsys)
        assert line.startswith(f"{name}.py: error: ") and fragment in line, line
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):
        script("bench_federated").main(["--seeds", "-1"])
    with pytest.raises(argparse.ArgumentTypeError):
        from fedprune.reporting import nonnegative_int

        nonnegative_int("-3")


def test_a_sweep_with_a_broken_base_config(tmp_path) -> None:
    from fedprune.sweep import SweepError, load_grid

    (tmp_path / "base.toml").write_text("seed = = 1\n")
    (tmp_path / "grid.toml").write_text('base = "base.toml"\nseeds = [0]\n[grid]\n"train.lr" = [0.1]\n')
    grid = load_grid(tmp_path / "grid.toml")
    with pytest.raises(SweepError, match=r"grid.toml'.*base config '.*base.toml' is not valid TOML"):
        grid.validate()


def test_a_finished_run_in_out_is_kept_unless_overwrite(tmp_path, capsys, monkeypatch) -> None:
    import fedprune.federated as federated

    calls = []
    monkeypatch.setattr(federated, "simulate", lambda cfg, out_dir, **k: calls.append((out_dir, k)) or {"summary": "ran"})
    monkeypatch.setattr("fedprune.centralized.run_centralized", lambda *a, **k: pytest.fail("prune may not run"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"a finished": "run"}')
    cfg = str(_tiny_toml(tmp_path))
    for command in ("simulate", "prune"):
        assert cli.main([command, "--config", cfg, "--out", str(run)]) == 2
        line = _error_line(capsys)
        assert f"--out '{run}' already holds a finished run" in line and "--overwrite" in line
    assert (run / "results.json").read_text() == '{"a finished": "run"}' and calls == []
    assert cli.main(["simulate", "--config", cfg, "--out", str(run), "--overwrite", "--engine", "inprocess"]) == 0
    assert calls == [(str(run), {"engine": "inprocess", "mask_source": "consensus", "warm_start": None})]
    assert not (run / "results.json").exists()  # gone before the new run starts: a run that stops early never looks finished


@pytest.mark.parametrize("argv, fragment", [
    (["--out", "", "--set", "seed=1"], "--out '' is empty"),
    (["--config", "", "--out", "OUT"], "--config '' is empty"),
    (["--out", "OUT", "--warm-start", "OUT"], "--out and --warm-start name the same directory"),
    (["--resume", "OUT", "--mask-source", "none"], "drop --mask-source"),
    (["--resume", "OUT", "--overwrite"], "drop --overwrite"),
    (["--resume", ""], "--resume '' is empty"),
    (["--out", "OUT", "--warm-start", ""], "--warm-start '' is empty"),
])
def test_simulate_flag_errors(tmp_path, capsys, monkeypatch, argv, fragment) -> None:
    import fedprune.federated as federated

    monkeypatch.setattr(federated, "simulate", lambda *a, **k: pytest.fail("nothing may run"))
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    config = [] if "--config" in argv or "--resume" in argv else ["--config", str(_tiny_toml(tmp_path))]
    assert cli.main(["simulate", *config, *argv]) == 2
    assert fragment in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_simulate_reads_the_default_config_from_the_repository_wherever_it_runs(tmp_path, monkeypatch) -> None:
    import fedprune.federated as federated

    seen = []
    monkeypatch.setattr(federated, "simulate", lambda cfg, out_dir, **k: seen.append(cfg) or {"summary": "ran"})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["simulate", "--out", "o", "--set", "federated.num_clients=7"]) == 0
    assert seen[0].federated.num_clients == 7 and seen[0].federated.warmup_rounds == load_config(ROOT / "configs/quick.toml").federated.warmup_rounds


def test_mask_source_choices_are_the_simulations() -> None:
    from fedprune.federated import MASK_SOURCES

    assert cli.MASK_SOURCE_CHOICES == MASK_SOURCES


def test_more_clients_than_training_images_is_a_config_error(tmp_path, capsys) -> None:
    argv = ["simulate", "--config", str(_tiny_toml(tmp_path)), "--out", str(tmp_path / "out"), "--engine", "inprocess",
            "--set", "data.synthetic_train=10", "federated.num_clients=20"]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert "federated.num_clients = 20" in line and "10 training images" in line
    # a partition whose arguments are fine but whose Dirichlet draw cannot give every client an image
    assert cli.main(argv[:-2] + ["data.synthetic_train=20", "federated.num_clients=20", "data.partition='dirichlet'", "data.alpha=0.05"]) == 2
    assert "data.partition = 'dirichlet' for federated.num_clients = 20 cannot be cut" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_seed_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'seed' = 18446744073709551616 is out of range: allowed \[0, 9223372036854775807\]"):
        load_config(None, TINY + [f"seed={2**64}"])


def test_written_results_are_readable_as_the_umask_allows(tmp_path) -> None:
    """mkstemp makes 0600 files; results get the mode of any new file under the process's umask (0644 under 022)."""
    from fedprune.reporting import FILE_MODE, write_json

    umask = os.umask(0o022)
    os.umask(umask)
    assert FILE_MODE == 0o666 & ~umask
    assert (write_json(tmp_path / "a.json", {"x": 1}).stat().st_mode & 0o777) == FILE_MODE


def test_missing_profiles_file_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"config key 'federated.profiles_file' = '/nonexistent/p.toml': .* does not exist"):
        load_config(None, TINY + ["federated.profiles_file='/nonexistent/p.toml'"])


def test_resume_of_a_file_says_it_is_a_file(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("keep")
    assert cli.main(["simulate", "--resume", str(tmp_path / "notes.txt"), "--engine", "inprocess"]) == 2
    assert "is a file, not a run directory" in _error_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_infeasible_budget_errors_name_the_profile(tmp_path, capsys) -> None:
    """Every allocation and the centralized check name the profile whose budget cannot be met."""
    for allocation in ("budget", "budget_uniform", "budget_fill"):
        argv = ["simulate", "--config", str(_tiny_toml(tmp_path)), "--out", str(tmp_path / allocation), "--engine", "inprocess", "--set",
                f"pruning.allocation='{allocation}'", "profiles.mobile_cpu.budgets={macs=1000}",
                "profiles.edge_gpu.budgets={macs=1e12}", "profiles.microcontroller.budgets={macs=1e12}"]
        assert cli.main(argv) == 2
        assert "macs (profile mobile_cpu): smallest achievable cost" in _error_line(capsys)
    argv = ["prune", "--config", str(_tiny_toml(tmp_path)), "--out", str(tmp_path / "c"), "--set", "pruning.allocation='budget'",
            "pruning.budget_profile='microcontroller'", "profiles.microcontroller.budgets={macs=1000}"]
    assert cli.main(argv) == 2
    assert "macs (profile microcontroller): smallest achievable cost" in _error_line(capsys)
