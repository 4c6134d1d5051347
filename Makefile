# Everything starts from a fresh machine with only Python 3.11: `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ORCH := $(VENV)/bin/orchestrator
STAMP := $(VENV)/.installed
# Bytecode caches on: a launch starts a dozen Python processes (CLI, actors, ranks) and the tests
# hundreds of launches; without __pycache__ each compiles our modules again (a CLI call: 0.62 s
# of CPU against 0.45 s). Some machines set PYTHONDONTWRITEBYTECODE for every shell.
unexport PYTHONDONTWRITEBYTECODE
DEMO_DATA := .orchestrator/data/stdlib

.PHONY: install sysdeps demo test test-gpu test-ray-floor screenshots bench lint clean

install: $(STAMP)

# pyproject keeps a torch range; the build is chosen here, as a pip constraint, so that torch and
# everything else come from one resolver run (a second `pip install` may swap torch for a newer
# CUDA build: a 6.4 GB venv). No GPU: the CPU build of 2.13.0 (a 2.2 GB venv in all). A GPU:
# 2.13.0's CUDA build. `make install TORCH_BUILD=cpu|cuda` overrides the choice.
TORCH_VERSION := 2.13.0
TORCH_BUILD ?= $(shell { command -v nvidia-smi || test -e /dev/nvidia0; } >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_PIN_cpu := torch==$(TORCH_VERSION)+cpu
TORCH_PIN_cuda := torch==$(TORCH_VERSION), !=$(TORCH_VERSION)+cpu
TORCH_PIN := $(TORCH_PIN_$(TORCH_BUILD))
ifeq ($(TORCH_PIN),)
$(error TORCH_BUILD must be cpu or cuda, not '$(TORCH_BUILD)')
endif

# s3fs (through aiobotocore) and moto (through boto3) each bound botocore tightly, and pip's
# resolver, free to choose, walks botocore's thousands of releases: resolving took over 5 minutes
# of CPU on a 2-core machine against 40 s with these three pinned to a set that fits together
# (pyproject keeps ranges; move the three together).
BOTO_PINS := botocore==1.43.117 boto3==1.43.117 aiobotocore==3.10.0

# $(call venv_install,VENV): the project and its test extra into VENV.
define venv_install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	printf '%s\n' '$(TORCH_PIN)' $(BOTO_PINS) > $(1)/constraints.txt
	$(1)/bin/python -m pip install --quiet -c $(1)/constraints.txt -e '.[test]'
	$(1)/bin/python -c 'import torch; print("torch", torch.__version__, "in $(1)")'
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml
	$(call venv_install,$(VENV))

$(DEMO_DATA)/index.json: | $(STAMP)
	$(ORCH) data prepare "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" --out $(DEMO_DATA)

demo: $(STAMP) $(DEMO_DATA)/index.json
	$(ORCH) launch configs/demo.yaml

# Debian packages the tests start for real: prometheus (scrapes our endpoint), chromium and
# chromium-driver (the web UI's browser tests drive it through Playwright; no browser download).
# postgresql: the tracking store's PostgreSQL backend (tests/pg_server.py runs initdb + pg_ctl on loopback).
SYSDEPS := prometheus chromium chromium-driver postgresql
sysdeps:
	@missing=""; for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Two pytest-xdist workers: one test's waits (Ray start-up, rendezvous, fault bounds) overlap
# another's work; on 2 cores the gain is small (README). With loadgroup, the tests that share a
# fixture of their own file stay on one worker (tests/grouping.py); the 30 slowest are listed at
# the end. Serially: `make test PYTEST_ARGS=`.
PYTEST_ARGS ?= -n 2 --dist loadgroup --durations=30
test: $(STAMP) sysdeps
	$(PY) -m pytest -q $(PYTEST_ARGS) tests
	$(MAKE) test-ray-floor

# The oldest Ray that pyproject allows, in a venv of its own, on the Ray tests of launch, fault
# tolerance, checkpoints and placement away from a node (what needs Ray >= 2.49).
FLOOR_VENV ?= .venv-rayfloor
RAY_FLOOR := $(shell sed -n 's/.*"ray\[default,train\]>=\([0-9.]*\)[",].*/\1/p' pyproject.toml)
FLOOR_TESTS := \
	tests/test_launch.py::test_launch_trains_and_tracks_both_ranks \
	tests/test_fault_tolerance.py::test_sigkilled_workers_recover_bit_exact_on_standby_workers \
	tests/test_checkpoint_ray.py::test_launch_writes_committed_checkpoints_and_lists_them \
	tests/test_hang.py::test_restart_avoids_the_culprit_node_when_there_is_room

# It layers on $(VENV): its own site-packages holds only Ray $(RAY_FLOOR) (found first), and a .pth
# file adds $(VENV)'s packages after it (torch, the project). Seconds, not a second full install;
# `pip check` fails if Ray $(RAY_FLOOR) wants versions $(VENV) does not have.
purelib = $$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
$(FLOOR_VENV)/.installed: $(STAMP)
	rm -rf $(FLOOR_VENV) && $(PYTHON) -m venv --without-pip $(FLOOR_VENV)
	echo "import site; site.addsitedir('$(call purelib,$(abspath $(VENV)))')" > $(call purelib,$(FLOOR_VENV))/_main_venv.pth
	$(PY) -m pip --python $(FLOOR_VENV)/bin/python install --quiet --no-deps 'ray[default,train]==$(RAY_FLOOR)'
	$(PY) -m pip --python $(FLOOR_VENV)/bin/python check
	touch $@

# The tests marked @pytest.mark.gpu (NCCL, the replica check on CUDA, NVML): they skip, saying
# why, on a machine without CUDA; run this on a GPU host.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -rs tests

test-ray-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -c 'import ray; assert ray.__version__ == "$(RAY_FLOOR)", ray.__version__'
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

# The browser tests, writing their screenshots into docs/screenshots (a plain test run does not).
screenshots: $(STAMP) sysdeps
	ORCHESTRATOR_SCREENSHOTS=1 $(PY) -m pytest -q tests/test_ui_browser.py

# Each benchmark compares against its peer side by side and prints JSON on its last line;
# docs/BENCHMARKS.md records the figures. `make bench` runs them all (about 45 minutes).
BENCHES := launch_overhead data_sampler checkpoint_writes tracking_store recovery ui_responsiveness hang_detection
bench: $(STAMP) sysdeps
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

bench-%: $(STAMP) sysdeps
	$(PY) bench/$*.py

lint: $(STAMP)
	$(VENV)/bin/ruff check common orchestrator actors checkpointing dataloading tests bench

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .orchestrator .pytest_cache
