"""Checkpoint and resume: a run killed after a round continues to the same results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedprune.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from fedprune.config import load_config
from fedprune.federated import FederatedPruning, InProcessTransport, resume_config, simulate

from conftest import TINY as BASE

TINY = [*BASE, "federated.warmup_rounds=2", "federated.finetune_rounds=2"]  # later values win
TIMINGS = ("wall_s", "simulated_round_s")


class Killed(Exception):
    """Stands in for the process being killed."""


class DyingTransport(InProcessTransport):
    """In-process clients, but the 'process' dies during exchange number ``die_at``."""

    def __init__(self, num_nodes: int, die_at: int):
        super().__init__(num_nodes)
        self.calls, self.die_at = 0, die_at

    def exchange(self, requests):
        self.calls += 1
        if self.calls == self.die_at:
            raise Killed
        return super().exchange(requests)


def _strip(res: dict, registrations: int = 1) -> dict:
    """The results without timings (which differ between runs), as if the clients had registered
    once (a resumed run registers them again, and its totals count every registration)."""
    out = {k: v for k, v in res.items() if k not in ("totals", "rounds")}
    out["rounds"] = [{k: v for k, v in r.items() if k not in TIMINGS} for r in res["rounds"]]
    out["totals"] = {k: v for k, v in res["totals"].items() if k != "wall_s"}
    for way in ("down", "up"):
        once = out["totals"][f"registration_bytes_{way}"] // registrations
        assert once * registrations == out["totals"][f"registration_bytes_{way}"]
        out["totals"][f"registration_bytes_{way}"] = once
        out["totals"][f"bytes_{way}"] -= once * (registrations - 1)
    return out


@pytest.mark.parametrize("die_at", [3, 6])  # after the warm-up rounds / inside the fine-tuning
def test_killed_run_resumes_to_the_same_results(tiny_cfg, tiny_run, tmp_path, die_at):
    full, _ = tiny_run
    with pytest.raises(Killed):
        FederatedPruning(tiny_cfg, DyingTransport(3, die_at), tmp_path).run()
    ckpt = load_checkpoint(tmp_path)
    assert 0 < ckpt["steps_done"] < len(ckpt["plan"])
    assert not (tmp_path / "results.json").exists()
    # Fresh clients (new contexts, no cached model), as after a restart.
    resumed = FederatedPruning(tiny_cfg, InProcessTransport(3), tmp_path).run(resume=True)
    assert _strip(resumed, registrations=2) == _strip(full)
    assert load_checkpoint(tmp_path)["steps_done"] == len(ckpt["plan"])


def test_resume_drops_masks_an_older_version_kept_for_profiles_without_clients(tmp_path):
    """Older checkpoints hold a mask for every profile, clients or not; a resumed run evaluates only its clients' profiles."""
    cfg = load_config(None, [*TINY, "federated.proportions={edge_gpu=0.5, mobile_cpu=0.5, microcontroller=0}"])
    with pytest.raises(Killed):
        FederatedPruning(cfg, DyingTransport(3, 6), tmp_path).run()  # inside the fine-tuning: masks exist
    ckpt = load_checkpoint(tmp_path)
    assert set(ckpt["profile_masks"]) == {"edge_gpu", "mobile_cpu"}
    ckpt["profile_masks"] = {**ckpt["profile_masks"], "microcontroller": ckpt["profile_masks"]["mobile_cpu"]}  # as written before
    save_checkpoint(tmp_path, ckpt)
    server = FederatedPruning(cfg, InProcessTransport(3), tmp_path)
    resumed = server.run(resume=True)
    assert list(server.profile_masks) == ["edge_gpu", "mobile_cpu"]
    assert all(set(r["accuracy"]) == {"edge_gpu", "mobile_cpu"} for r in resumed["rounds"] if r["phase"] == "finetune")


def test_dry_run_of_a_resume_says_how_far_the_run_got(tiny_cfg, tiny_run, tmp_path, capsys):
    from fedprune import cli

    with pytest.raises(Killed):
        FederatedPruning(tiny_cfg, DyingTransport(3, 3), tmp_path).run()
    done, steps = load_checkpoint(tmp_path)["steps_done"], len(load_checkpoint(tmp_path)["plan"])
    assert cli.main(["simulate", "--resume", str(tmp_path), "--dry-run"]) == 0
    assert f"resume: {done} of {steps} steps done; --resume continues with round" in capsys.readouterr().out
    assert load_checkpoint(tmp_path)["steps_done"] == done and not (tmp_path / "results.json").exists()
    _, finished = tiny_run
    assert cli.main(["simulate", "--resume", str(finished), "--dry-run"]) == 0
    assert "finished already; --resume would do nothing" in capsys.readouterr().out


def test_checkpoint_after_every_round_is_atomic(tiny_cfg, tiny_run):
    _, out = tiny_run
    ckpt = load_checkpoint(out)
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    # Every step is checkpointed; the static-BN round after the last step belongs to the final evaluation.
    assert ckpt["steps_done"] == len(ckpt["plan"]) and ckpt["rounds"] == rounds[:-1] and rounds[-1]["phase"] == "bn_calibration"
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])
    assert not (out / (CHECKPOINT_FILE + ".tmp")).exists()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    from fedprune.checkpoint import REQUIRED_KEYS

    complete = dict.fromkeys(REQUIRED_KEYS)
    save_checkpoint(tmp_path, {**complete, "steps_done": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, {**complete, "steps_done": 2, "bad": Unpicklable()})
    assert load_checkpoint(tmp_path)["steps_done"] == 1


def test_resume_errors_are_clear(tiny_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)
    # A checkpoint written under another config is refused, not silently mixed.
    with pytest.raises(Killed):
        FederatedPruning(tiny_cfg, DyingTransport(3, 3), tmp_path).run()
    other = load_config(None, TINY + ["seed=5"])
    with pytest.raises(CheckpointError, match="different config"):
        FederatedPruning(other, InProcessTransport(3), tmp_path).run(resume=True)


def test_cli_resume(tiny_cfg, tiny_run, tmp_path, capsys):
    full, _ = tiny_run
    with pytest.raises(Killed):
        FederatedPruning(tiny_cfg, DyingTransport(3, 6), tmp_path).run()
    assert resume_config(tmp_path)[0] == FederatedPruning(tiny_cfg, InProcessTransport(3)).cfg
    cmd = [sys.executable, "-m", "fedprune.cli", "simulate", "--resume", str(tmp_path), "--engine", "inprocess"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == full["summary"]
    assert _strip(json.loads((tmp_path / "results.json").read_text()), registrations=2) == _strip(json.loads(json.dumps(full)))
    # resuming the finished run again changes nothing: no clients, no re-evaluation, the same files
    from fedprune import cli

    files = {p.name: p.read_bytes() for p in (tmp_path / "results.json", tmp_path / CHECKPOINT_FILE)}
    assert cli.main(["simulate", "--resume", str(tmp_path), "--engine", "inprocess"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == full["summary"]
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "results.json", tmp_path / CHECKPOINT_FILE)}
    bad = subprocess.run(cmd + ["--set", "seed=3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "drop --set" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(cmd[:5] + [str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_state_survives_round_trip(tiny_cfg, tmp_path):
    with pytest.raises(Killed):
        FederatedPruning(tiny_cfg, DyingTransport(3, 6), tmp_path).run()
    ckpt = load_checkpoint(tmp_path)
    server = FederatedPruning(tiny_cfg, InProcessTransport(3), tmp_path)
    server.register()
    server.restore(ckpt)
    assert all(torch.equal(server.state[k], ckpt["state"][k]) for k in ckpt["state"])
    assert set(server.profile_masks) == {"edge_gpu", "mobile_cpu", "microcontroller"}


# ------------------------------------------------------------ warm start
def test_warm_start_equals_a_run_that_trains_its_own_warmup(tmp_path) -> None:
    """One dense warm-up (mask source "none", no fine-tune rounds) serves a consensus run and a longer
    dense run; both give exactly the results of runs that trained the warm-up themselves."""
    from fedprune.config import load_config
    from fedprune.federated import simulate

    from conftest import TINY

    from fedprune import cli

    cfg = load_config(None, TINY)
    defaults = tmp_path / "defaults.toml"
    defaults.write_text("")
    # the warm-up through the command line: a dense-only run that stops after its warm-up
    assert cli.main(["simulate", "--config", str(defaults), "--out", str(tmp_path / "warm"), "--engine", "inprocess", "--mask-source", "none",
                     "--set", *TINY, "federated.finetune_rounds=0", "pruning.criterion='l2'", "federated.nested_training=true"]) == 0
    for source in ("consensus", "none"):
        scratch = simulate(cfg, tmp_path / f"scratch_{source}", engine="inprocess", mask_source=source)
        if source == "consensus":
            assert cli.main(["simulate", "--config", str(defaults), "--out", str(tmp_path / "forked"), "--engine", "inprocess",
                             "--warm-start", str(tmp_path / "warm"), "--set", *TINY]) == 0
            forked = json.loads((tmp_path / "forked" / "results.json").read_text())
        else:
            forked = simulate(cfg, tmp_path / f"forked_{source}", engine="inprocess", mask_source=source, warm_start=tmp_path / "warm")
        assert forked["dense"]["accuracy"] == scratch["dense"]["accuracy"]
        assert [(r["round"], r["phase"], r.get("accuracy")) for r in forked["rounds"]] == \
               [(r["round"], r["phase"], r.get("accuracy")) for r in scratch["rounds"]]
        assert {p: e["accuracy"] for p, e in forked["profiles"].items()} == {p: e["accuracy"] for p, e in scratch["profiles"].items()}


def test_warm_start_refuses_other_warmups(tmp_path) -> None:
    from fedprune.checkpoint import CheckpointError
    from fedprune.config import load_config
    from fedprune.federated import simulate

    from conftest import TINY

    warm = load_config(None, TINY + ["federated.finetune_rounds=0"])
    simulate(warm, tmp_path / "warm", engine="inprocess", mask_source="none")
    other = load_config(None, TINY + ["train.lr=0.01"])
    with pytest.raises(CheckpointError, match=r"differs in keys that shape the dense warm-up: train.lr"):
        simulate(other, tmp_path / "a", engine="inprocess", warm_start=tmp_path / "warm")
    longer = load_config(None, TINY + ["federated.warmup_rounds=0"])
    with pytest.raises(CheckpointError, match="warmup_rounds"):
        simulate(longer, tmp_path / "b", engine="inprocess", warm_start=tmp_path / "warm")
    with pytest.raises(CheckpointError, match="does not exist"):
        simulate(load_config(None, TINY), tmp_path / "c", engine="inprocess", warm_start=tmp_path / "nowhere")
    # a consensus run's checkpoint has pruned already: no dense warm-up to take over beyond its first steps
    done = simulate(load_config(None, TINY), tmp_path / "full", engine="inprocess")
    assert done["profiles"]
    fine = load_config(None, TINY + ["federated.finetune_rounds=2"])
    with pytest.raises(CheckpointError, match="are not dense rounds that begin this run"):
        simulate(fine, tmp_path / "d", engine="inprocess", warm_start=tmp_path / "full")


def test_scoring_the_last_warmup_model_survives_a_restart(tmp_path) -> None:
    """federated.score_model = "last_warmup" keeps the model sent in the last warm-up round in the checkpoint: a run
    killed before its importance round, or warm-started from a warm-up that kept it, scores that model (its restarted
    clients lack their copy and are sent it, counted in the round's bytes) and ends with the same numbers."""
    cfg = load_config(None, TINY + ["federated.score_model='last_warmup'"])
    full = FederatedPruning(cfg, InProcessTransport(3), tmp_path / "full").run()
    with pytest.raises(Killed):  # exchanges: register, warm-up 1, warm-up 2, importance
        FederatedPruning(cfg, DyingTransport(3, die_at=4), tmp_path / "killed").run()
    assert load_checkpoint(tmp_path / "killed")["warmup_input"]["version"] == 1
    resumed = FederatedPruning(cfg, InProcessTransport(3), tmp_path / "killed").run(resume=True)

    def numbers(res):
        return res["profiles"], [(r["round"], r["phase"], r.get("accuracy"), r.get("scored_model_version")) for r in res["rounds"]]

    assert numbers(resumed) == numbers(full)
    imp = {r["phase"]: r for r in full["rounds"]}["importance"], {r["phase"]: r for r in resumed["rounds"]}["importance"]
    assert imp[1]["bytes_down"] > 100 * imp[0]["bytes_down"]  # the model, resent to the restarted clients ...
    assert imp[0]["model_delivery_bytes_down"] == 0 < imp[1]["model_delivery_bytes_down"] < imp[1]["bytes_down"]  # ... as delivery
    assert imp[1]["bytes_down"] - imp[1]["model_delivery_bytes_down"] == imp[0]["bytes_down"]  # the score requests are the same
    # warm starts: from a warm-up that kept the model, the same numbers; from one that did not, a clear error
    warm = load_config(None, TINY + ["federated.score_model='last_warmup'", "federated.finetune_rounds=0"])
    simulate(warm, tmp_path / "warm", engine="inprocess", mask_source="none")
    forked = simulate(cfg, tmp_path / "forked", engine="inprocess", warm_start=tmp_path / "warm")
    assert numbers(forked) == numbers(full)
    plain = load_config(None, TINY + ["federated.finetune_rounds=0"])
    with pytest.raises(Killed):  # a warm-up stopped after its first round: the run trains the last one itself
        FederatedPruning(plain, DyingTransport(3, die_at=3), tmp_path / "plain", mask_source="none").run()
    part = simulate(cfg, tmp_path / "part", engine="inprocess", warm_start=tmp_path / "plain")
    assert numbers(part) == numbers(full) and [r for r in part["rounds"] if r["phase"] == "importance"][0]["model_delivery_bytes_down"] == 0
    simulate(plain, tmp_path / "plain", engine="inprocess", mask_source="none")
    with pytest.raises(CheckpointError, match="score_model = 'last_warmup'.*did not keep it"):
        simulate(cfg, tmp_path / "refused", engine="inprocess", warm_start=tmp_path / "plain")
