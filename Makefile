# The study's commands. `make help` lists them; every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# GPU=1: the environment from requirements-gpu.lock (TensorFlow's CUDA build) instead of
# requirements.lock (tensorflow-cpu); every target that installs honours it, so export it on GPU
# nodes. Each lock has its own stamp: switching builds the venv afresh from the other lock.
GPU ?=
ifneq ($(filter-out 0 1,$(GPU)),)
$(error GPU=$(GPU): expected 1 (TensorFlow's CUDA build) or 0)
endif
LOCK := $(if $(filter 1,$(GPU)),requirements-gpu.lock,requirements.lock)
OTHER_LOCK := $(if $(filter 1,$(GPU)),requirements.lock,requirements-gpu.lock)
STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu)
OTHER_STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),,-gpu)
export KERAS_HOME ?= $(CURDIR)/.cache/keras
export TF_CPP_MIN_LOG_LEVEL ?= 2

.DEFAULT_GOAL := help
SPEC ?= sweeps/specs/quick.yaml
SMOKE ?=
UI_PORT ?= 5000
LOCAL_TRACKING := sqlite:///$(CURDIR)/runs/mlflow.db
# Passed on to a Ray job. Never the token: `ray job submit` (with RAY_AUTH_MODE=token) reads it from
# RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token itself; nor a database password: libpq
# reads it from the file PGPASSFILE names.
GIT_COMMIT = $(shell git rev-parse HEAD 2>/dev/null)
GIT_DIRTY = $(shell test -z "$$(git status --porcelain 2>/dev/null)" && echo false || echo true)
# S3 settings that are not secrets, passed only when set (an empty endpoint would be one); the
# credentials stay the nodes' own (an instance role, ~/.aws/credentials, their environment). And
# STUDY_CLUSTER_CAN_GROW when set: the driver's own resource check reads it too.
AWS_SETTINGS := AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_REGION AWS_DEFAULT_REGION
comma := ,
JOB_SET = $(foreach v,$(AWS_SETTINGS) STUDY_CLUSTER_CAN_GROW STUDY_DRIVER_LOCK,$(if $($(v)),"$(v)": "$($(v))"$(comma)))
# RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's
# default 3); the driver closes its record and leaves within STUDY_STOP_GRACE_S (10) + ~5 s.
JOB_ENV = {"env_vars": {$(JOB_SET)"MLFLOW_TRACKING_URI": "$(MLFLOW_TRACKING_URI)", "STORAGE": "$(STORAGE)", \
  "OPTUNA_STORAGE": "$(OPTUNA_STORAGE)", "PGPASSFILE": "$(PGPASSFILE)", "RAY_JOB_STOP_WAIT_TIME_S": "30", \
  "STUDY_GIT_COMMIT": "$(GIT_COMMIT)", "STUDY_GIT_DIRTY": "$(GIT_DIRTY)"}, \
  "excludes": [".venv", "runs", ".cache", ".git", "paper/runs"]}

# In the order they run: the learning-rate selection, the tables' sweeps at the selected rates, the
# CNN's selection and its table at the rates it chose.
PAPER_SPECS := $(foreach s,lr_select lr_select_wide t1_mlp t1_gated t1_bottleneck t3_ablations t2_grid lr_select_cnn t1_cnn,\
  sweeps/specs/$(s).yaml)
# The size of the specs that sweep, paper-sweeps, paper and tables use. SIZE=full: the specs as
# written (converged training on the full data, about 11 hours on 2 cores); SIZE=quick: their `quick:`
# sections (the paper's sweeps at 6 epochs on 20,000 images, about 20 minutes: a laptop check);
# SIZE=smoke: their `smoke:` sections (CI's size, about 2 minutes). SMOKE=1 is SIZE=smoke.
SIZE ?= $(if $(SMOKE),smoke,full)
ifeq ($(filter full quick smoke,$(SIZE)),)
$(error SIZE=$(SIZE): expected full, quick or smoke)
endif
ifneq ($(SMOKE),)
ifneq ($(SIZE),smoke)
$(error SMOKE=1 means SIZE=smoke, not SIZE=$(SIZE): give one of them)
endif
endif
SIZE_ARG := $(if $(filter-out full,$(SIZE)),--size $(SIZE))
# TIME_LIMIT=4h (any `timeout` duration): the sweep stops itself then, as on SIGTERM (its record
# closed KILLED, resumable by the same command; exit status 124), wherever it runs.
TIME_LIMIT ?=
LIMIT := $(if $(TIME_LIMIT),timeout --signal=TERM --kill-after=60 $(TIME_LIMIT))

NOTEBOOKS := $(wildcard analysis/notebooks/*.py)

LOCAL_STACK := sweeps/cluster/local

.PHONY: help setup lock lock-gpu lock-backends data system-deps test test-backends test-fast test-integration lint train sweep ui \
	paper-sweeps paper tables notebooks bench dashboard cluster-up cluster-down mlflow-server mlflow-server-down clean \
	images

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The activation's fused CPU kernels (study/fused.py loads them), rebuilt when their source or the
# packages change. x86-64: AVX2 without FMA where the CPU has it, so the float arithmetic is that of
# TensorFlow's own kernels (built for AVX, without FMA); elsewhere the compiler's default target.
KERNEL := study/kernels/sigmoid_or_binary.so
KERNEL_ARCH ?= $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo "-mavx2 -mno-fma" || \
  { grep -qw avx /proc/cpuinfo 2>/dev/null && echo -mavx; })

setup: $(STAMP) $(KERNEL) ## Virtual environment with the pinned packages (requirements.lock; GPU=1: requirements-gpu.lock), the fused kernels

$(KERNEL): study/kernels/sigmoid_or_binary.cc $(STAMP)
	@command -v $(CXX) >/dev/null || { echo "error: $(CXX) not found: the fused activation kernels need a C++17 compiler (set CXX=...)"; exit 2; }
	$(CXX) -std=c++17 -shared -fPIC -O3 $(KERNEL_ARCH) -ffp-contract=off -Wno-deprecated-declarations \
	  -Wno-ignored-attributes -Wno-interference-size $< -o $@.tmp $$($(PY) -c "import tensorflow as tf; \
	  print(' '.join(tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags()))" 2>/dev/null)
	@mv $@.tmp $@

$(STAMP): $(LOCK) pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 2; }
	@if [ -e $(OTHER_STAMP) ]; then echo "$(VENV) is from $(OTHER_LOCK): removing it"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

lock: ## Re-pin requirements.lock from pyproject.toml, then requirements-gpu.lock (needs the package registry)
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	.lock-venv/bin/pip freeze --exclude-editable > requirements.lock && rm -rf .lock-venv
	$(MAKE) --no-print-directory lock-gpu lock-backends

# requirements-gpu.lock: requirements.lock's pins with tensorflow-cpu replaced by tensorflow[and-cuda]
# of the same version, resolved by pip from the packages' metadata (a dry run: no wheel is
# installed), in pip freeze's form and order (pip, setuptools and wheel left out as freeze does).
TF_VERSION = $(shell sed -n 's/^tensorflow[-_]cpu==//p' requirements.lock)
define GPU_LOCK_PY
import json
pins = [(p["metadata"]["name"], p["metadata"]["version"])
        for p in json.load(open(".lock-venv/report.json"))["install"]]
print("# requirements.lock with TensorFlow's CUDA build (tensorflow[and-cuda]) for tensorflow-cpu,\n"
      "# resolved by pip for Linux; regenerate with `make lock-gpu` (`make lock` regenerates both).")
print("\n".join(f"{n}=={v}" for n, v in sorted(pins, key=lambda p: p[0].lower())
                if n.lower() not in ("pip", "setuptools", "wheel", "distribute")))
endef
export GPU_LOCK_PY

lock-gpu: ## Re-pin requirements-gpu.lock from requirements.lock with TensorFlow's CUDA build (needs the package registry)
	@test -n "$(TF_VERSION)" || { echo "error: requirements.lock pins no tensorflow-cpu"; exit 2; }
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	grep -v '^tensorflow[-_]cpu==' requirements.lock > .lock-venv/cpu.txt
	.lock-venv/bin/pip install --dry-run --ignore-installed --quiet --report .lock-venv/report.json \
	  -r .lock-venv/cpu.txt 'tensorflow[and-cuda]==$(TF_VERSION)'
	.lock-venv/bin/python -c "$$GPU_LOCK_PY" > requirements-gpu.lock.tmp && rm -rf .lock-venv
	@mv requirements-gpu.lock.tmp requirements-gpu.lock

data: setup ## Install Fashion-MNIST (Debian's dataset-fashion-mnist where apt works, else download)
	@if $(PY) -m study data --no-download >/dev/null 2>&1; then $(PY) -m study data --no-download; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; \
	  $(PY) -m study data --no-download; \
	else $(PY) -m study data; fi

system-deps: ## PostgreSQL and Chromium from Debian (make mlflow-server, the integration tests)
	@if ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 && command -v chromium >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq postgresql chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq postgresql chromium >/dev/null; }; \
	else echo "error: install PostgreSQL and Chromium (Debian: apt-get install postgresql chromium)"; exit 2; fi

test: setup data lint test-backends ## All tests but the integration ones, slow ones included (CI runs both)
	$(PY) -m pytest -m "not integration"

# The activation on Keras' JAX and PyTorch backends (CPU), in an environment without TensorFlow:
# tests/test_backends.py (the op against the NumPy reference) and bench/gpu_check.py's smoke size.
BACKENDS_VENV := .venv-backends
BACKENDS := jax torch
$(BACKENDS_VENV)/.installed: requirements-backends.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 2; }
	rm -rf $(BACKENDS_VENV) && $(PYTHON) -m venv $(BACKENDS_VENV)
	$(BACKENDS_VENV)/bin/pip install --quiet --upgrade pip
	$(BACKENDS_VENV)/bin/pip install --quiet -r requirements-backends.lock
	@touch $@

test-backends: $(BACKENDS_VENV)/.installed ## The activation under JAX and PyTorch on the CPU (no TensorFlow)
	set -e; for backend in $(BACKENDS); do \
	  KERAS_BACKEND=$$backend PYTHONPATH=$(CURDIR) $(BACKENDS_VENV)/bin/python -m pytest -q tests/test_backends.py; \
	done

# requirements-backends.lock: Keras, NumPy and pytest at requirements.lock's pins, JAX's CPU build
# and PyTorch (its CPU wheel where pip finds one), resolved by pip.
PIN = $(shell grep -i '^$(1)==' requirements.lock)
BACKEND_PACKAGES = $(call PIN,keras) $(call PIN,numpy) $(call PIN,pytest) 'jax[cpu]==0.10.2' torch==2.13.0
lock-backends: ## Re-pin requirements-backends.lock (needs the package registry)
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet $(BACKEND_PACKAGES)
	{ echo "# The environment of \`make test-backends\`: Keras on JAX and PyTorch (CPU builds), without TensorFlow;"; \
	  echo "# regenerate with \`make lock-backends\` (\`make lock\` regenerates every lock)."; \
	  .lock-venv/bin/pip freeze | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > requirements-backends.lock
	rm -rf .lock-venv

test-integration: setup data system-deps ## Two-node Ray cluster, MLflow on PostgreSQL, faults, browser
	$(PY) -m pytest -m integration

test-fast: setup ## The fast tests only (no Fashion-MNIST training, no servers)
	$(PY) -m pytest -m "not slow and not integration"

lint: setup ## ruff
	$(VENV)/bin/ruff check study sweeps analysis tests bench

train: setup data ## One trial: make train ARGS="--set activation.p=0.5 --set model.arch=cnn"
	$(PY) -m study train $(ARGS)

sweep: setup data ## Run or resume a sweep [SPEC=...] [SIZE=full|quick|smoke] [TIME_LIMIT=4h] [RAY_ADDRESS=http://head:8265] [MLFLOW_TRACKING_URI=...] [STORAGE=...]
	@test -z "$(TIME_LIMIT)" || [[ "$(TIME_LIMIT)" =~ ^[0-9]+(\.[0-9]+)?[smhd]?$$ ]] || { echo "error: \
	  TIME_LIMIT=$(TIME_LIMIT): expected a duration such as 3600 (seconds), 90m, 4h or 2d"; exit 2; }
	$(PY) -m sweeps check --reachable $(SIZE_ARG) $(SPEC)
ifdef RAY_ADDRESS
	@test -n "$(MLFLOW_TRACKING_URI)" || { echo "error: a cluster sweep needs MLFLOW_TRACKING_URI (a tracking server)"; exit 2; }
	@test -n "$(STORAGE)" || { echo "error: a cluster sweep needs STORAGE (a shared path or s3://...)"; exit 2; }
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(VENV)/bin/ray job submit --address "$(RAY_ADDRESS)" --working-dir . \
	  --runtime-env-json '$(JOB_ENV)' -- $(LIMIT) python -m sweeps run $(SIZE_ARG) $(SPEC)
else
	$(LIMIT) $(PY) -m sweeps run $(SIZE_ARG) $(SPEC)
endif

paper-sweeps: setup data ## Run the paper's sweeps (SIZE=full|quick|smoke) into the tracking store; at full size each spec's runs are exported (paper/runs/EXPERIMENT) as its sweep ends
	$(PY) -m sweeps check $(SIZE_ARG) $(PAPER_SPECS)
	set -e; for spec in $(PAPER_SPECS); do $(PY) -m sweeps run $(SIZE_ARG) $$spec; \
	  if [ "$(SIZE)" = full ]; then $(PY) -m analysis export --experiment \
	    $$($(PY) -c "from sweeps.spec import load_spec; print(load_spec('$$spec').experiment)"); fi; \
	done

paper: paper-sweeps ## The paper's sweeps (SIZE=full|quick|smoke), then the tables (full: from every export in paper/runs; quick, smoke: runs/paper-SIZE)
ifeq ($(SIZE),full)
	$(PY) -m analysis tables --source paper/runs
else
	$(PY) -m analysis tables $(SIZE_ARG)
endif

tables: setup ## Tables and figures into paper/ from every committed export in paper/runs (SIZE=quick|smoke: runs/paper-SIZE, from the local store) [SOURCE=...] [SWEEPS="id ..."]
	$(PY) -m analysis tables $(SIZE_ARG) $(if $(SOURCE),--source $(SOURCE),$(if $(filter full,$(SIZE)),--source paper/runs)) $(foreach s,$(SWEEPS),--sweep $(s))

notebooks: setup ## Execute analysis/notebooks/*.py headless into runs/notebooks/*.html
	@mkdir -p runs/notebooks
	set -e; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb .py); \
	  $(VENV)/bin/jupytext --quiet --to ipynb --output runs/notebooks/$$name.ipynb $$nb; \
	  $(VENV)/bin/jupyter nbconvert --to html --execute --ExecutePreprocessor.timeout=600 \
	    runs/notebooks/$$name.ipynb --output-dir runs/notebooks; \
	done

# The node images (docker/*.Dockerfile: the Makefile's setup and data in python:3.11-slim-bookworm), named
# as the cluster templates name them; tagged with the commit they are built from (-dirty: with changes).
REGISTRY ?=
IMAGE_TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null)$(if $(filter true,$(GIT_DIRTY)),-dirty)
IMAGE = $(if $(REGISTRY),$(REGISTRY)/)sigmoid-or-binary-$(1):$(IMAGE_TAG)
images: ## Build the CPU and GPU node images (docker/) [REGISTRY=...] [IMAGE_TAG=...] [PUSH=1]
	@test -n "$(GIT_COMMIT)" || { echo "error: no git commit (an image records its commit)"; exit 2; }
	@test -z "$(PUSH)" || test -n "$(REGISTRY)" || { echo "error: PUSH=1 needs REGISTRY=..."; exit 2; }
	set -e; for kind in cpu gpu; do \
	  docker build -f docker/$$kind.Dockerfile --build-arg STUDY_GIT_COMMIT=$(GIT_COMMIT) \
	    --build-arg STUDY_GIT_DIRTY=$(GIT_DIRTY) -t $(call IMAGE,$$kind) .; \
	  $(if $(PUSH),docker push $(call IMAGE,$$kind);) \
	done

cluster-up: setup data ## A two-node Ray cluster on this machine (127.0.0.1, token auth); prints RAY_ADDRESS
	$(LOCAL_STACK)/ray-cluster.sh up

cluster-down: ## Stop the cluster of cluster-up (by its process groups)
	$(LOCAL_STACK)/ray-cluster.sh down

mlflow-server: setup system-deps ## MLflow tracking server on PostgreSQL, http://127.0.0.1:5001
	$(LOCAL_STACK)/mlflow-server.sh up

mlflow-server-down: ## Stop the server and the database of mlflow-server
	$(LOCAL_STACK)/mlflow-server.sh down

bench: setup data ## The ten benchmarks, side by side; writes bench/results.json and bench/results.md
	$(PY) bench/run.py

STUDIES ?= sqlite:///$(CURDIR)/runs/optuna.db
DASHBOARD_PORT ?= 8080
dashboard: setup ## optuna-dashboard of the sweeps' Optuna studies (runs/optuna.db) on http://127.0.0.1:8080 [STUDIES=...] [DASHBOARD_PORT=...]
	@case "$(STUDIES)" in sqlite:///*) test -f "$(patsubst sqlite:///%,%,$(STUDIES))" || \
	  { echo "error: no Optuna studies yet ($(patsubst sqlite:///%,%,$(STUDIES))): run a tpe or qmc sweep first"; exit 2; };; esac
	@echo "optuna-dashboard: http://127.0.0.1:$(DASHBOARD_PORT)/dashboard (one study per sweep id; Ctrl-C stops it)"
	$(VENV)/bin/optuna-dashboard --host 127.0.0.1 --port $(DASHBOARD_PORT) "$(STUDIES)"

# Without MLflow's job workers (seven processes, ~1.7 GB, for GenAI scorers and trace jobs): a browse
# of the runs does not use them.
ui: setup ## Serve the MLflow UI of the local store on http://127.0.0.1:5000 (UI_PORT=...)
	@mkdir -p runs
	@echo "MLflow UI: the runs of each experiment (Ctrl-C stops the server):"
	@$(PY) -m sweeps ui --tracking-uri $(LOCAL_TRACKING) --base http://127.0.0.1:$(UI_PORT)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	  $(VENV)/bin/mlflow server --workers 1 --backend-store-uri $(LOCAL_TRACKING) \
	  --artifacts-destination $(CURDIR)/runs/mlartifacts --host 127.0.0.1 --port $(UI_PORT)

clean: ## Remove caches and run outputs (keeps the virtual environment)
	rm -rf .cache runs .pytest_cache .ruff_cache
