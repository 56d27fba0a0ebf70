"""Experiment configuration: TOML files validated on load.

A config file has a top-level ``seed`` and the tables ``[data]``, ``[model]``,
``[train]``, ``[pruning]``, ``[federated]``, ``[eval]``, ``[dynamic]``; device profiles come
from ``configs/profiles.toml`` (or the file named by ``federated.profiles_file``)
and may be overridden per field in ``[profiles.NAME]`` tables. Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` with one line
naming the key, the value and what is allowed.

Overrides use dotted keys: ``--set pruning.sparsity=0.7 federated.num_clients=20``
(values are parsed as TOML, falling back to a plain string).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "ProfileConfig",
    "load_config",
    "load_profiles",
    "config_from_dict",
    "parse_overrides",
    "config_to_dict",
    "DEFAULT_PROFILES_FILE",
    "PROFILE_NAMES",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROFILES_FILE = REPO_ROOT / "configs" / "profiles.toml"
#: Profile names, from the most capable to the least.
PROFILE_NAMES = ("edge_gpu", "mobile_cpu", "microcontroller")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or out of range."""


def _spec(default=dataclasses.MISSING, *, choices=None, lo=None, hi=None, lo_open=False, hi_open=False, doc=""):
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


DATASETS = ("cifar10", "synthetic")
# The names configs accept; the implementations live in fedprune.models.MODEL_NAMES, fedprune.importance.CRITERIA and
# fedprune.aggregation (tests check that they match): a new model or criterion goes in both places.
MODELS = ("seed_cnn", "resnet20", "mobilenetv2")
CRITERIA = ("l1", "l2", "variance", "bn_gamma", "gradient", "taylor", "fisher", "activation", "reconstruction")
#: Allocations of per-group keep ratios from a channel sparsity (fedprune.allocation.allocate).
SPARSITY_ALLOCATIONS = ("uniform", "global", "sensitivity")
#: Ways to meet per-profile hardware budgets (fedprune.allocation.budget_masks):
#: ``budget`` -- greedy importance-per-cost removal (nested_budget_masks);
#: ``budget_uniform`` -- the smallest uniform layer-wise sparsity that meets the budgets;
#: ``budget_fill`` -- ``budget_uniform``'s widths, then the budget left over filled greedily
#: (most importance gained per cost added first): never narrower than uniform in any layer;
#: ``constant_cost`` -- the notebook's baseline: every channel costs the same, so a
#: budget at fraction f of the dense cost keeps the globally best f of all channels.
BUDGET_ALLOCATIONS = ("budget", "budget_uniform", "budget_fill", "constant_cost")
#: ``pruning.allocation`` values.
ALLOCATIONS = SPARSITY_ALLOCATIONS + BUDGET_ALLOCATIONS
#: What the greedy budget allocation keeps as much of (``pruning.budget_objective``):
#: ``log`` -- the sum over groups of log(share of the group's normalised importance kept),
#: so no layer is emptied to save a little cost (the default); ``sum`` -- the summed
#: normalised importance kept (linear, as HALP's knapsack), which can starve one layer.
BUDGET_OBJECTIVES = ("log", "sum")
#: Dynamic per-input pruning (fedprune.dynamic): FBS-style channel gates, or adaptive width (early-exit cascade).
DYNAMIC_METHODS = ("gates", "widths")
#: How a cascade stage's confidence is read from its logits (fedprune.dynamic.exit_confidence): top-1 minus
#: top-2 softmax probability, or the top softmax probability.
EXIT_RULES = ("margin", "max_prob")
#: Where batch-1 latency can be measured (fedprune.metrics.deployed): eager PyTorch, or the same deployment
#: form exported to ONNX and run by ONNX Runtime (a few microseconds of overhead per call instead of ~20 us per operator).
LATENCY_RUNTIMES = ("torch", "onnxruntime")
#: Largest ``pruning.budget_sensitivity``: the power on the layer-sensitivity weights.
MAX_BUDGET_SENSITIVITY = 4.0
#: Allowed profile budget keys -> (what is limited, unit). Latencies are device estimates:
#: host ms / the profile's compute_speed (see fedprune.cost.device_factor).
BUDGET_KEYS: dict[str, str] = {
    "flash_bytes_int8": "parameter storage at int8, bytes",
    "peak_sram_bytes_int8": "peak activation memory at int8 (batch 1), bytes",
    "macs": "multiply-accumulates of a batch-1 forward pass",
    "params": "number of parameters",
    "latency_ms_b1": "CPU latency at batch 1, ms",
    "latency_ms_b64": "CPU latency at batch 64, ms",
}
SCHEDULES = ("one_shot", "progressive", "lottery")
PARTITIONS = ("iid", "dirichlet", "pathological")
AGGREGATIONS = ("mean", "median", "trimmed_mean", "rank_vote")
#: How an adversarial client poisons its importance (see fedprune.adversarial).
ADVERSARIAL_MODES = ("inverted", "random", "scaled")
#: How a failing client fails (see fedprune.reliability).
FAILURE_MODES = ("crash", "hang", "drop")
TOO_FEW_REPLIES_POLICIES = ("retry", "skip")
#: Which global model the clients score in the importance round after the warm-up (``federated.score_model``).
SCORE_MODELS = ("current", "last_warmup")


@dataclass
class DataConfig:
    dataset: str = _spec("cifar10", choices=DATASETS)
    data_dir: str = _spec("", doc="directory holding cifar-10-batches-py; '' = FEDPRUNE_DATA_DIR, ./data, download")
    download: bool = True
    synthetic_train: int = _spec(2000, lo=10)
    synthetic_test: int = _spec(500, lo=10)
    partition: str = _spec("iid", choices=PARTITIONS)
    alpha: float = _spec(0.5, lo=0.0, lo_open=True)
    classes_per_client: int = _spec(2, lo=1, hi=10)
    val_fraction: float = _spec(0.1, lo=0.0, hi=0.9)
    test_samples: int = _spec(0, lo=0, doc="evaluate on the first N test images; 0 = all")


@dataclass
class ModelConfig:
    name: str = _spec("seed_cnn", choices=MODELS)
    width_mult: float = _spec(1.0, lo=0.1, hi=4.0, doc="mobilenetv2 only")


@dataclass
class TrainConfigSection:
    epochs: int = _spec(8, lo=0)
    lr: float = _spec(1e-3, lo=0.0, lo_open=True, doc="method 'gates': gate-training learning rate (widths train in the fine-tuning itself)")
    optimizer: str = _spec("adam", choices=("sgd", "adam"))
    momentum: float = _spec(0.9, lo=0.0, hi=1.0)
    weight_decay: float = _spec(0.0, lo=0.0)
    batch_size: int = _spec(64, lo=1)
    cosine: bool = False
    threads: int = _spec(2, lo=1, hi=256)


@dataclass
class PruningConfig:
    criterion: str = _spec("l2", choices=CRITERIA)
    sparsity: float = _spec(0.5, lo=0.0, hi=1.0, hi_open=True)
    allocation: str = _spec("uniform", choices=ALLOCATIONS)
    schedule: str = _spec("one_shot", choices=SCHEDULES)
    stages: int = _spec(3, lo=1, doc="progressive stages / lottery rounds")
    finetune_epochs: int = _spec(5, lo=0)
    num_batches: int = _spec(8, lo=1, doc="batches for data-driven criteria")
    min_channels: int = _spec(1, lo=1)
    round_to: int = _spec(0, lo=0, doc="round kept channels up to a multiple; 0 = off (budget allocations: 8)")
    sensitivity_ratios: list = _spec([0.2, 0.5, 0.8])
    rewind_epoch: int = _spec(0, lo=0, doc="lottery ticket: rewind to weights after this many epochs")
    budget_profile: str = _spec("", doc="centralized runs with a budget allocation: the profile whose budgets to meet")
    latency_margin: float = _spec(0.1, lo=0.0, hi=0.5, hi_open=True, doc="budget allocations aim latency budgets at limit x (1 - margin) "
                                  "and accept a timed sub-network up to limit x (1 - margin / 2)")
    budget_objective: str = _spec("log", choices=BUDGET_OBJECTIVES, doc="allocations 'budget' and 'budget_fill': 'log' keeps the most of "
                                  "sum(log share of each group's importance kept), 'sum' of the summed importance kept")
    budget_sensitivity: float = _spec(0.0, lo=0.0, hi=MAX_BUDGET_SENSITIVITY, doc="allocation 'budget': each group's lost importance is weighted by "
                                      "(layer sensitivity / mean) ** this power; 0 = unweighted (no sensitivity measured)")

    @property
    def budget_weighted(self) -> bool:
        """Whether allocation ``budget`` weights each group's lost importance by layer sensitivity."""
        return self.allocation == "budget" and self.budget_sensitivity > 0

    @property
    def needs_sensitivity(self) -> bool:
        """Whether the allocation uses layer sensitivity (measured with the importance)."""
        return self.allocation == "sensitivity" or self.budget_weighted


@dataclass
class FederatedConfig:
    num_clients: int = _spec(10, lo=1)
    clients_per_round: int = _spec(0, lo=0, doc="0 = all clients every round")
    warmup_rounds: int = _spec(3, lo=0)
    finetune_rounds: int = _spec(3, lo=0)
    repeat_every: int = _spec(0, lo=0, doc="progressive federated pruning: redo importance+consensus every k fine-tune rounds; 0 = once")
    prune_stages: int = _spec(0, lo=0, doc="with repeat_every = k > 0, how many importance+consensus stages (at fine-tune rounds "
                              "1, 1+k, 1+2k, ...); its masks are fine-tuned from the last stage's round to the end; 0 = as many as fit, "
                              "max(1, ceil(finetune_rounds / k))")
    aggregation: str = _spec("mean", choices=AGGREGATIONS)
    trim_fraction: float = _spec(0.2, lo=0.0, hi=0.5, hi_open=True)
    screen_clients: bool = _spec(False, doc="drop clients whose channel ranking disagrees with the median ranking before "
                                 "aggregating importance (fedprune.aggregation.screen_clients)")
    adversarial_fraction: float = _spec(0.0, lo=0.0, hi=1.0, hi_open=True, doc="simulated poisoned importance: round(fraction x "
                                        "num_clients) partitions, chosen from the seed, send poisoned scores (fedprune.adversarial)")
    adversarial_mode: str = _spec("inverted", choices=ADVERSARIAL_MODES, doc="'inverted' (ranking reversed), 'random' (uniform noise "
                                  "in the honest range), 'scaled' (inverted, own bottom half x adversarial_scale)")
    adversarial_scale: float = _spec(100.0, lo=0.0, lo_open=True, doc="boost factor of the 'scaled' mode")
    score_model: str = _spec("current", choices=SCORE_MODELS, doc="the model the clients score in the importance round after the "
                             "warm-up: 'current' -- the global model after the last warm-up round, delivered to them in an evaluate "
                             "message (about half a dense round of bytes); 'last_warmup' -- the global model they received for the "
                             "last warm-up round, cached before training, so that importance round sends only configs and score "
                             "vectors (the model scored is one round older than the one pruned; later progressive rounds score the current model)")
    sensitivity: bool = _spec(False, doc="clients also measure layer sensitivity (turned on for allocation='sensitivity' and for "
                              "allocation='budget' with pruning.budget_sensitivity > 0)")
    profiles_file: str = _spec("", doc="'' = configs/profiles.toml")
    proportions: dict = _spec({"edge_gpu": 0.3, "mobile_cpu": 0.4, "microcontroller": 0.3})
    num_cpus_per_client: float = _spec(1.0, lo=0.0, lo_open=True)
    num_gpus_per_client: float = _spec(0.0, lo=0.0)
    ray_num_cpus: int = _spec(2, lo=1, doc="CPUs of the local Ray instance (ignored when connecting to a cluster)")
    ray_address: str = _spec("", doc="Ray cluster to run the simulation on: 'host:port' (GCS address of `ray start --head`), "
                             "'auto' (the latest `ray start` on this machine); '' = $RAY_ADDRESS if set, "
                             "else start a local Ray instance with ray_num_cpus CPUs")
    min_replies_fraction: float = _spec(0.5, lo=0.0, hi=1.0, doc="a train or importance round needs valid replies from at least "
                                        "max(1, ceil(fraction x sampled clients)) clients; fewer -> on_too_few_replies")
    on_too_few_replies: str = _spec("retry", choices=TOO_FEW_REPLIES_POLICIES, doc="'retry': re-send the round to a fresh sample "
                                    "(at most max_retries times, then skip); 'skip': keep the global model (and masks) unchanged")
    max_retries: int = _spec(2, lo=0, doc="re-sends (count) of a round that got too few valid replies")
    reply_timeout_s: float = _spec(0.0, lo=0.0, doc="seconds the server waits for the replies of one message exchange "
                                   "(Grid.send_and_receive timeout; in-process engine: per client; registration always waits); 0 = wait for every reply")
    failure_modes: list = _spec(["crash", "drop"], doc="how a client fails with its profile's failure_prob: 'crash' (the ClientApp "
                                "raises), 'drop' (node-unavailable error reply), 'hang' (no reply before reply_timeout_s; needs it > 0)")
    eval_every: int = _spec(1, lo=0, doc="evaluate the global model every k rounds; 0 = only at the end")
    nested_training: bool = _spec(False, doc="fine-tuning trains each client's sub-network together with the narrower profiles' "
                                  "sub-networks nested in it (FjORD-style; fedprune/nested.py)")
    nested_distill: float = _spec(1.0, lo=0.0, doc="nested training: weight of distillation from the client's own sub-network")
    final_eval_clients: int = _spec(100, lo=0, doc="the final local-validation accuracy (profiles.NAME.local_val_accuracy) "
                                    "comes from a seeded sample of at most this many clients (plus one per profile it misses); 0 = all")

    @property
    def stages_that_fit(self) -> int:
        """Importance+consensus stages that fit in the fine-tuning, one every ``repeat_every`` rounds (1 without)."""
        return max(1, math.ceil(self.finetune_rounds / self.repeat_every)) if self.repeat_every else 1

    @property
    def stages(self) -> int:
        """Importance+consensus stages of the run (``prune_stages``, or all that fit)."""
        return self.prune_stages or self.stages_that_fit


@dataclass
class EvalConfig:
    latency: bool = _spec(True, doc="measure CPU latency (batch 1 and 64, ms) of the final models")
    latency_threads: int = _spec(1, lo=1, doc="torch threads while timing latency (ms) and building latency tables")
    latency_repeats: int = _spec(20, lo=1, doc="timed repeats per latency measurement (median)")
    static_bn: bool = _spec(True, doc="federated runs: after the last round the final-evaluation clients measure each final "
                            "sub-network's BatchNorm statistics on their shards (forward passes only) and the server pools them "
                            "(HeteroFL's static BN); false = statistics averaged from the clients' local models of the last round")


@dataclass
class DynamicConfig:
    """Dynamic per-input pruning (fedprune.dynamic): channel gates or adaptive width, trained by clients during fine-tuning."""

    enabled: bool = _spec(False, doc="dynamic per-input pruning on each profile's sub-network (dynamic.method), reported per profile")
    method: str = _spec("gates", choices=DYNAMIC_METHODS, doc="'gates': FBS-style per-channel gates at fixed budgets; 'widths': adaptive "
                        "width per input, an early-exit cascade over nested widths that clients train during fine-tuning")
    widths: list = _spec([0.5, 1.0], doc="method 'widths': the cascade's widths (fraction of each conv layer's channels), ascending, the last 1")
    exit_rule: str = _spec("margin", choices=EXIT_RULES, doc="method 'widths': an input stops at a width when this confidence reaches "
                           "the threshold: 'margin' (top-1 minus top-2 softmax probability) or 'max_prob' (top softmax probability)")
    thresholds: list = _spec([0.1, 0.2, 0.4], doc="method 'widths': exit thresholds (confidences in [0, 1], by dynamic.exit_rule) reported per profile")
    narrow_ce: float = _spec(0.5, lo=0.0, doc="method 'widths': weight of each narrower width's cross-entropy in the sandwich loss "
                             "(the full width's weighs 1)")
    width_distill: float = _spec(0.0, lo=0.0, doc="method 'widths': weight of each narrower width's distillation from the full width")
    latency_inputs: int = _spec(64, lo=1, doc="method 'widths': test images timed per variant for the cascade's mean batch-1 latency")
    latency_runtime: str = _spec("onnxruntime", choices=LATENCY_RUNTIMES, doc="method 'widths': where the cascade and the static "
                                 "sub-network are timed: 'onnxruntime' (each exported to ONNX, a deployment runtime) or 'torch' (eager "
                                 "PyTorch, whose ~20 us per operator dominate small networks at batch 1)")
    epochs: int = _spec(1, lo=0, doc="method 'gates': local gate-training epochs per fine-tune round (static sub-network frozen)")
    lr: float = _spec(1e-3, lo=0.0, lo_open=True, doc="method 'gates': gate-training learning rate (widths train in the fine-tuning itself)")
    distill: float = _spec(1.0, lo=0.0, doc="method 'gates': weight of distillation from the full-budget sub-network")
    train_budgets: list = _spec([0.5, 0.75], doc="budgets cycled over the gate-training steps, each in (0, 1]")
    eval_budgets: list = _spec([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], doc="budgets reported per profile, each in (0, 1]")
    gated_layers: list = _spec([], doc="indices of the gated conv blocks; [] = all but the last")
    round_to: int = _spec(8, lo=1, doc="kept channels per gated layer go to the nearest multiple of this (CPU kernels' fast path)")


@dataclass
class ProfileConfig:
    """One device class. Speed and bandwidth feed the simulated round time."""

    sparsity: float = _spec(0.5, lo=0.0, hi=1.0, hi_open=True, doc="channel sparsity target")
    local_epochs: int = _spec(1, lo=0)
    batch_size: int = _spec(32, lo=1)
    compute_speed: float = _spec(1.0, lo=0.0, lo_open=True, doc="relative to the host (1 = host speed)")
    bandwidth_mbps: float = _spec(10.0, lo=0.0, lo_open=True, doc="uplink/downlink in megabit/s")
    failure_prob: float = _spec(0.0, lo=0.0, hi=1.0, hi_open=True, doc="probability that a client fails on a round's message "
                                "(train, importance), drawn from the seed; how: federated.failure_modes")
    budgets: dict = _spec({}, doc="hardware budgets {key: limit}, keys in BUDGET_KEYS; used by the budget allocations and reported per run")


@dataclass
class ExperimentConfig:
    seed: int = _spec(0, lo=0, hi=2**63 - 1, doc="seeds every random choice of the run (a signed 64-bit integer, as torch needs)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfigSection = field(default_factory=TrainConfigSection)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    profiles: dict = field(default_factory=dict)  # name -> ProfileConfig


# --------------------------------------------------------------- validation
def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _check_value(key: str, value: Any, f: dataclasses.Field, hint) -> Any:
    meta = f.metadata
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r} has the wrong type: expected true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' = {value!r} has the wrong type: expected an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config key '{key}' = {value!r} has the wrong type: expected a finite number")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' = {value!r} has the wrong type: expected a string")
    elif hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' = {value!r} has the wrong type: expected a list")
    elif hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' = {value!r} has the wrong type: expected a table")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed; choose one of {list(meta['choices'])}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None or hi is not None:
        below = lo is not None and (value <= lo if meta["lo_open"] else value < lo)
        above = hi is not None and (value >= hi if meta["hi_open"] else value > hi)
        if below or above:
            left = "(" if meta["lo_open"] else "["
            right = ")" if meta["hi_open"] else "]"
            rng = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
            raise ConfigError(f"config key '{key}' = {value!r} is out of range: allowed {rng}")
    return value


def _build(cls, values: Mapping[str, Any], prefix: str):
    if not isinstance(values, Mapping):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; allowed keys here: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, fields[name], hint)
    return cls(**kwargs)


def load_profiles(path: str | Path | None = None) -> dict[str, ProfileConfig]:
    """Read and validate a profiles file (``[NAME]`` tables of :class:`ProfileConfig` fields)."""
    path = Path(path) if path else DEFAULT_PROFILES_FILE
    raw = read_toml(path)
    return {name: _build_profile(name, table) for name, table in raw.items()}


def _build_profile(name: str, table: Mapping) -> "ProfileConfig":
    prof = _build(ProfileConfig, table, f"profiles.{name}.")
    for key, limit in prof.budgets.items():
        if key not in BUDGET_KEYS:
            raise ConfigError(f"unknown budget key 'profiles.{name}.budgets.{key}'; allowed: {sorted(BUDGET_KEYS)}")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            raise ConfigError(f"config key 'profiles.{name}.budgets.{key}' = {limit!r} must be a positive number ({BUDGET_KEYS[key]})")
    return prof


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """The TOML file at ``path`` as a dict; :class:`ConfigError` (naming ``what`` and the path) when it is
    missing, a directory, not UTF-8 or not valid TOML."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory; give a .toml file")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None


def deep_update(base: dict, extra: Mapping) -> dict:
    """Merge ``extra`` into ``base`` in place (tables recursively, other values replaced); returns ``base``."""
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def parse_overrides(items: list[str] | None) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict; values parsed as TOML, else kept as strings."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. pruning.sparsity=0.7)")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"override {item!r} conflicts with the override of '{prefix}' = {node!r}")
        node[parts[-1]] = value
    return out


def config_from_dict(raw: Mapping, base_dir: Path | None = None, resolved: bool = False) -> ExperimentConfig:
    """Validate a nested dict (as read from TOML) into an :class:`ExperimentConfig`.

    With ``resolved=True`` the dict is a complete, already resolved config
    (:func:`config_to_dict` output): its ``profiles`` tables are taken as they
    are instead of overriding the profiles file.
    """
    raw = dict(raw)
    profile_overrides = raw.pop("profiles", {})
    cfg = _build(ExperimentConfig, raw, "")
    if resolved:
        cfg.profiles = {name: _build_profile(name, table) for name, table in profile_overrides.items()}
        _check_cross_field(cfg)
        return cfg
    pfile = cfg.federated.profiles_file
    if pfile and base_dir is not None and not Path(pfile).is_absolute():
        pfile = str((base_dir / pfile).resolve())
    if pfile and not Path(pfile).is_file():
        raise ConfigError(f"config key 'federated.profiles_file' = {cfg.federated.profiles_file!r}: {pfile!r} "
                          f"{'is not a file' if Path(pfile).exists() else 'does not exist'} ('' = configs/profiles.toml)")
    profiles = load_profiles(pfile or None)
    if not isinstance(profile_overrides, Mapping):
        raise ConfigError(f"config key 'profiles' must be a table of profile tables, got {profile_overrides!r}")
    for name, table in profile_overrides.items():
        if name not in profiles:
            raise ConfigError(f"unknown profile 'profiles.{name}'; allowed: {sorted(profiles)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"config key 'profiles.{name}' must be a table, got {table!r}")
        merged = dataclasses.asdict(profiles[name])
        if "budgets" in table:  # a budgets table replaces the file's budgets instead of merging into them
            merged.pop("budgets")
        merged = deep_update(merged, table)
        profiles[name] = _build_profile(name, merged)
    cfg.profiles = profiles
    _check_cross_field(cfg)
    return cfg


def _check_cross_field(cfg: ExperimentConfig) -> None:
    props = cfg.federated.proportions
    for name, p in props.items():
        if name not in cfg.profiles:
            raise ConfigError(f"unknown profile 'federated.proportions.{name}'; allowed: {sorted(cfg.profiles)}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or p < 0:
            raise ConfigError(f"config key 'federated.proportions.{name}' = {p!r} must be a number >= 0")
    total = sum(props.values())
    if abs(total - 1.0) > 1e-6:
        given = ", ".join(f"{n}={p:g}" for n, p in props.items())
        raise ConfigError(f"config key 'federated.proportions' = {{{given}}} sums to {total:g}; the proportions must sum to 1 "
                          "(an override merges into the config's table: give every profile, 0 for those without clients)")
    used = [n for n, p in props.items() if p > 0]
    if len(used) > cfg.federated.num_clients:
        raise ConfigError(
            f"config key 'federated.num_clients' = {cfg.federated.num_clients} is smaller than the "
            f"{len(used)} profiles with a non-zero proportion; every profile needs a client"
        )
    if cfg.federated.clients_per_round > cfg.federated.num_clients:
        raise ConfigError(
            f"config key 'federated.clients_per_round' = {cfg.federated.clients_per_round} exceeds "
            f"federated.num_clients = {cfg.federated.num_clients}"
        )
    if not cfg.pruning.sensitivity_ratios:
        raise ConfigError("config key 'pruning.sensitivity_ratios' = [] is empty; give at least one ratio in (0, 1)")
    for r in cfg.pruning.sensitivity_ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise ConfigError(f"config key 'pruning.sensitivity_ratios' holds {r!r}; each ratio must be in (0, 1)")
    fed = cfg.federated
    if fed.prune_stages > 1 and fed.repeat_every == 0:
        raise ConfigError(f"config key 'federated.prune_stages' = {fed.prune_stages} needs progressive pruning "
                          "(federated.repeat_every = k > 0); with federated.repeat_every = 0 there is one stage: allowed 0 or 1")
    if fed.repeat_every and fed.prune_stages > fed.stages_that_fit:
        fit = fed.stages_that_fit
        raise ConfigError(f"config key 'federated.prune_stages' = {fed.prune_stages} does not fit: with federated.finetune_rounds = "
                          f"{fed.finetune_rounds} and federated.repeat_every = {fed.repeat_every} there is room for at most {fit} stage(s); "
                          "allowed: 0 (as many as fit) to " + str(fit))
    if cfg.federated.score_model == "last_warmup" and cfg.federated.warmup_rounds == 0:
        raise ConfigError("config key 'federated.score_model' = 'last_warmup' needs a warm-up round to score, but "
                          "federated.warmup_rounds = 0; use score_model = 'current' or warmup_rounds >= 1")
    if cfg.pruning.budget_sensitivity > 0 and cfg.pruning.allocation != "budget":
        raise ConfigError(f"config key 'pruning.budget_sensitivity' = {cfg.pruning.budget_sensitivity:g} applies to "
                          f"pruning.allocation = 'budget' only, not {cfg.pruning.allocation!r}; set it to 0")
    if cfg.federated.nested_training and cfg.dynamic.enabled and cfg.dynamic.method == "widths":
        raise ConfigError("config key 'federated.nested_training' = true cannot be combined with dynamic.method = 'widths', whose "
                          "fine-tuning already trains nested widths; turn one of them off")
    if cfg.pruning.needs_sensitivity and not cfg.federated.sensitivity:
        cfg.federated.sensitivity = True  # the allocation cannot work without it
    if cfg.pruning.allocation in BUDGET_ALLOCATIONS:
        missing = [n for n in used if not cfg.profiles[n].budgets]
        if missing:
            raise ConfigError(
                f"config key 'pruning.allocation' = {cfg.pruning.allocation!r} needs budgets for every profile in use; "
                f"profiles without budgets: {missing} (set profiles.NAME.budgets, keys {sorted(BUDGET_KEYS)})"
            )
    for key in ("train_budgets", "eval_budgets"):
        values = getattr(cfg.dynamic, key)
        if not values or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1 for b in values):
            raise ConfigError(f"config key 'dynamic.{key}' = {values!r} must be a non-empty list of budgets in (0, 1]")
    widths = cfg.dynamic.widths
    if (not widths or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1 for w in widths)
            or list(widths) != sorted(set(widths)) or widths[-1] != 1):
        raise ConfigError(f"config key 'dynamic.widths' = {widths!r} must be distinct widths in (0, 1], ascending, the last 1")
    thresholds = cfg.dynamic.thresholds
    if (not thresholds or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1 for t in thresholds)
            or len(set(thresholds)) != len(thresholds)):
        raise ConfigError(f"config key 'dynamic.thresholds' = {thresholds!r} must be a non-empty list of distinct confidences in [0, 1]")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in cfg.dynamic.gated_layers):
        raise ConfigError(f"config key 'dynamic.gated_layers' = {cfg.dynamic.gated_layers!r} must list conv block indices >= 0")
    if cfg.dynamic.enabled and cfg.model.name != "seed_cnn":
        raise ConfigError(f"config key 'dynamic.enabled' = true needs model.name = 'seed_cnn' (a plain conv stack); got {cfg.model.name!r}")
    bp = cfg.pruning.budget_profile
    if bp and bp not in cfg.profiles:
        raise ConfigError(f"config key 'pruning.budget_profile' = {bp!r} is not a profile; allowed: {sorted(cfg.profiles)}")
    if bp and cfg.pruning.allocation in BUDGET_ALLOCATIONS and not cfg.profiles[bp].budgets:
        raise ConfigError(f"config key 'pruning.budget_profile' = {bp!r} names a profile without budgets")
    modes = cfg.federated.failure_modes
    if not modes or any(m not in FAILURE_MODES for m in modes) or len(set(modes)) != len(modes):
        raise ConfigError(f"config key 'federated.failure_modes' = {modes!r} must be a non-empty list of distinct modes from {list(FAILURE_MODES)}")
    failing = [n for n in used if cfg.profiles[n].failure_prob > 0]
    if "hang" in modes and failing and cfg.federated.reply_timeout_s <= 0:
        raise ConfigError(f"config key 'federated.failure_modes' includes 'hang' but federated.reply_timeout_s = 0 (no timeout); "
                          f"set a reply timeout in seconds for the failing profiles {failing}")
    if cfg.data.data_dir and not Path(cfg.data.data_dir).is_dir():
        raise ConfigError(f"config key 'data.data_dir' = {cfg.data.data_dir!r} is not an existing directory")


def load_config(path: str | Path | None = None, overrides: list[str] | Mapping | None = None) -> ExperimentConfig:
    """Load ``path`` (or defaults when None), apply overrides, validate."""
    raw: dict = {}
    base_dir = None
    if path is not None:
        path = Path(path)
        raw = read_toml(path)
        base_dir = path.resolve().parent
    extra = parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else dict(overrides or {})
    return config_from_dict(deep_update(raw, extra), base_dir)


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """Plain, JSON/TOML-friendly dict of a resolved config."""
    return dataclasses.asdict(cfg)


def config_without(config: dict, keys: Mapping[str, tuple[str, ...] | None], profile_keys: tuple[str, ...] = ()) -> dict:
    """Copy of a config dict (:func:`config_to_dict`) without some keys, e.g. to compare
    only the part that shapes a run: ``keys`` maps a section to the names to drop from it
    (None: the whole section); ``profile_keys`` are dropped from every profile."""
    out = copy.deepcopy(config)
    for section, names in keys.items():
        if names is None:
            out.pop(section, None)
        else:
            for k in names:
                out.get(section, {}).pop(k, None)
    for prof in out.get("profiles", {}).values():
        for k in profile_keys:
            prof.pop(k, None)
    return out
