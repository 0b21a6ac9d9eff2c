# cdp — the two commands you need: `make up` (run the platform) and `make test` (run the tests).
SHELL := bash
.DEFAULT_GOAL := help
export UV_PYTHON ?= 3.11
export UV_PYTHON_DOWNLOADS ?= never
export UV_LINK_MODE ?= copy
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
GRPC_TOOLS_VERSION := 1.85.1
PROTO_OUT := libs/cdp-protos/src

.PHONY: help env lock lock-check up status test test-fast soak fuzz proto proto-check lint models bench bench-% deploy-check clean

help: ## list targets
	@grep -hE '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(UV):
	python3 -m venv .tools
	.tools/bin/pip install --disable-pip-version-check -q uv==$(UV_VERSION)

# uv.lock is an input, never an output: only `make lock` rewrites it. The uv binary is an order-only
# prerequisite, so installing it (a newer file) never re-syncs or re-locks anything.
$(VENV)/.synced: pyproject.toml uv.lock $(wildcard libs/*/pyproject.toml services/*/pyproject.toml) | $(UV)
	@$(MAKE) --no-print-directory lock-check
	$(UV) sync --all-packages --locked
	@touch $@

lock-check: | $(UV) ## fail when uv.lock no longer matches the pyproject.toml files
	@$(UV) lock --check -q || { echo "uv.lock is out of date with the pyproject.toml files: run \`make lock\` and commit uv.lock" >&2; exit 1; }

lock: | $(UV) ## re-resolve uv.lock after changing dependencies in a pyproject.toml (then commit it)
	$(UV) lock

env: $(VENV)/.synced ## create the environment (.venv) from uv.lock

up: env ## run nats-server and every service on the embedded store (Ctrl-C stops all)
	$(VENV)/bin/cdpctl up

status: env ## health of a running platform
	$(VENV)/bin/cdpctl status

# Tests run on every core (pytest-xdist); a module's tests stay on one worker so a module-scoped fixture (a
# nats-server, a running platform) starts once, and the longest modules go first so the workers finish
# together (cdp_testing.scheduling; its durations.json). Six workers on two cores: most tests wait on other
# processes (platforms starting, services catching up, timers) more than they compute - with one worker a core
# the CPU stayed 30-90 % idle and the suite took 775 s here, with three 638 s, with four 613 s and with six
# 509 s on a quiet machine (four left a quarter of the CPU idle). The tests' waits are bounded by conditions,
# not by sleeps, so the extra contention slows them without failing them: six passed beside three other
# jobs at a load average of 14. TEST_WORKERS=0 runs them in this process, one after another.
# Bytecode is written and read: the tests start hundreds of Python processes (xdist workers, every
# service of each platform and fault test, each cdpctl command), and with PYTHONDONTWRITEBYTECODE set, as
# some shells and images have it, each one compiled every module it imports from source again - half the
# CPU of a platform's start, three quarters of collecting the tests. The .pyc files go to __pycache__
# folders that git and .dockerignore leave out.
TEST_WORKERS ?= 6
FUZZ_WORKERS ?= auto
test: env ## run all tests (real nats-server), six at a time (TEST_WORKERS)
	env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadscope

soak: env ## the whole-platform kill test, long: CDP_SOAK_SECONDS (600) of load, a kill every CDP_SOAK_KILL_EVERY (10) s
	CDP_SOAK_SECONDS=$${CDP_SOAK_SECONDS:-600} $(VENV)/bin/pytest -q -p no:cacheprovider tests/fault/test_platform_kill.py

fuzz: env ## the fuzz tests (tests/fuzz) with CDP_FUZZ_SCALE (50) times the inputs `make test` gives them, fresh ones each run
# (loadfile, not loadscope: `make test` keeps tests/fuzz on one worker for its one platform; here each module gets a core)
	CDP_FUZZ_SCALE=$${CDP_FUZZ_SCALE:-50} $(VENV)/bin/pytest -q -p no:cacheprovider -n $(FUZZ_WORKERS) --dist loadfile --timeout 3600 tests/fuzz

proto: env ## regenerate the committed stubs from protos/
	$(PY) -m cdp_testing.protocheck generate protos $(PROTO_OUT)

proto-check: env ## fail when the committed stubs are stale
	$(PY) -m cdp_testing.protocheck check protos $(PROTO_OUT)

lint: env ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

models: env ## train the shipped models (customer simulator -> LightGBM / scikit-learn -> ONNX), fixed seed
	$(PY) -m cdp_training

deploy-check: env ## validate the Helm chart and skaffold.yaml statically
	$(VENV)/bin/pytest -q tests/deploy

bench: env ## run every benchmark; results in bench/results/*.json
	@for b in bench/bench_*.py; do n=$${b#bench/bench_}; n=$${n%.py}; $(MAKE) --no-print-directory bench-$$n || exit 1; done

bench-%: env ## run one benchmark, e.g. make bench-ingest
	$(PY) bench/bench_$*.py

clean:
	rm -rf $(VENV) .tools .cdp
