# Everything starts from a fresh machine with only Python 3.11: `make test`, `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ORCH := $(VENV)/bin/orchestrator
STAMP := $(VENV)/.installed
DEMO_DATA := .orchestrator/data/stdlib

.PHONY: install sysdeps demo test screenshots bench lint clean

install: $(STAMP)

# torch is pinned here only: 2.13.0 is the CPU wheel on this disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(DEMO_DATA)/index.json: | $(STAMP)
	$(ORCH) data prepare "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" --out $(DEMO_DATA)

demo: $(STAMP) $(DEMO_DATA)/index.json
	$(ORCH) launch configs/demo.yaml

# Debian packages the tests start for real: prometheus (scrapes our endpoint), chromium and
# chromium-driver (the web UI's browser tests drive it through Playwright; no browser download).
SYSDEPS := prometheus chromium chromium-driver
sysdeps:
	@missing=""; for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test: $(STAMP) sysdeps
	$(PY) -m pytest -q tests

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
	$(VENV)/bin/ruff check orchestrator actors checkpointing dataloading tests bench

clean:
	rm -rf $(VENV) .orchestrator .pytest_cache
