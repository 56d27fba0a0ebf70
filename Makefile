# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1
export HF_DATASETS_OFFLINE ?= 1
export MPLCONFIGDIR ?= $(CURDIR)/.cache/matplotlib
# Real CIFAR-10 subset beside the checkout, when present (see README "Data")
SHARED_CIFAR := $(wildcard $(CURDIR)/../shared/data/cifar10-subset)
export FEDPRUNE_DATA_DIR ?= $(SHARED_CIFAR)

.PHONY: demo test install bench-centralized bench-federated bench-hardware bench-dynamic bench-reliability bench-scale sweep-noniid sweep-profile-mix sweep-progressive clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# torch/torchvision first, pinned exactly (pip takes them from this machine's disk when present)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Main simulation: configs/quick.toml (uses FEDPRUNE_DATA_DIR / ./data / download, see README)
demo: $(STAMP)
	$(VENV)/bin/fedprune simulate --config configs/quick.toml --out runs/demo --overwrite

# Tests on every core (pytest-xdist), one file per worker at a time: tests/test_integration.py holds every test that
# starts Ray or Flower processes, so they run one after another (some check by PID that none is left)
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench-centralized: $(STAMP)
	$(PY) simulation/centralized_table.py --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}

bench-federated: $(STAMP)
	$(PY) simulation/bench_federated.py --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}

bench-hardware: $(STAMP)
	$(PY) simulation/bench_hardware.py --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}

bench-dynamic: $(STAMP)
	$(PY) simulation/bench_dynamic.py --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}

bench-reliability: $(STAMP)
	$(PY) simulation/bench_reliability.py --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}

bench-scale: $(STAMP)
	$(PY) simulation/bench_scale.py --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}

# Sweeps (configs/sweeps/*.toml): cells go to runs/sweeps/NAME (a re-run skips finished cells), tables to benchmarks/sweep_NAME.md
sweep-noniid: $(STAMP)
	$(PY) simulation/sweep.py --grid configs/sweeps/noniid.toml --out runs/sweeps/noniid --benchmarks noniid --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}

sweep-profile-mix: $(STAMP)
	$(PY) simulation/sweep.py --grid configs/sweeps/profile_mix.toml --out runs/sweeps/profile_mix --benchmarks profile_mix --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}

sweep-progressive: $(STAMP)
	$(PY) simulation/sweep.py --grid configs/sweeps/progressive.toml --out runs/sweeps/progressive --benchmarks progressive --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}
	$(PY) simulation/sweep.py --grid configs/sweeps/progressive_early.toml --out runs/sweeps/progressive_early --benchmarks progressive_early --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}
	$(PY) simulation/sweep.py --grid configs/sweeps/progressive_long.toml --out runs/sweeps/progressive_long --benchmarks progressive_long --data-dir $${FEDPRUNE_DATA_DIR:-../shared/data/cifar10-subset}

clean:
	rm -rf runs .pytest_cache .cache
