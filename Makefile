# Two entry points: `make train` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/unet_isbi
CONFIG ?= configs/unet.py

.PHONY: train test test-long lint format benchmark benchmark-accelerator clean-venv

# XLA:CPU allocates each step's scratch afresh and glibc hands it back to the
# kernel, so every step faults it in again (~10% of the configs/unet.py step on
# 2 cores; see README, Performance). make train keeps it cheap: jemalloc where
# installed (Debian/Ubuntu: apt install libjemalloc2), keeping freed pages;
# else glibc's malloc backing large blocks with transparent huge pages (glibc
# >= 2.35; older ones ignore the setting). JEMALLOC= skips jemalloc.
comma := ,
JEMALLOC ?= $(firstword $(wildcard /usr/lib/*/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2))
FAST_MALLOC := $(if $(JEMALLOC),LD_PRELOAD=$(JEMALLOC) MALLOC_CONF=dirty_decay_ms:-1$(comma)muzzy_decay_ms:-1,GLIBC_TUNABLES=glibc.malloc.hugetlb=1)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

train: $(STAMP)
	$(FAST_MALLOC) $(BIN)/python scripts/train.py --config=$(CONFIG) --workdir=$(WORKDIR)
	$(FAST_MALLOC) $(BIN)/python scripts/evaluate.py --config=$(CONFIG) --workdir=$(WORKDIR) --best

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q -m "not long" tests

# Multi-minute end-to-end tests (SIGKILL/SIGTERM resume, sweeps, inspection
# from checkpoints); CI runs them after `make test`.
test-long: $(STAMP)
	$(BIN)/python -m pytest -q -m long tests

# Regenerates README.md's performance table (about 6 minutes on 2 CPU cores),
# with the C library's malloc like the PyTorch figures it compares with
# (LD_PRELOAD=<libjemalloc.so.2> make benchmark times both sides with jemalloc).
BENCH := $(BIN)/python scripts/benchmark.py --config=configs/unet.py \
	--workdir=runs/benchmark --readme=README.md
RGB := --config.data.mean=0.5,0.5,0.5 --config.data.std=0.25,0.25,0.25 \
	--config.data.convert_grayscale=True \
	--config.optim.name=sgd
benchmark: $(STAMP)
	$(BENCH) --name=a_width64_256px --batch_size=2 --input_size=256,256 \
		--config.model.base_width=64 $(RGB)
	$(BENCH) --name=b_width16_352x480 --batch_size=4 --input_size=352,480 \
		--config.model.base_width=16 $(RGB)
	$(BENCH) --name=configs_unet_py

# The accelerator rows of README.md's table; run on a GPU or TPU machine with
# PyTorch beside it for the twin (PYTHON: an environment with the project).
ACCEL_BENCH := $(PYTHON) scripts/benchmark.py --workdir=runs/benchmark_gpu \
	--rounds=2 --pipeline=false --matmul_size=8192 --readme=README.md
benchmark-accelerator:
	$(ACCEL_BENCH) --config=configs/unet.py --name=configs_unet_py
	$(ACCEL_BENCH) --config=configs/unet.py $(RGB) --name=a_width64_256px \
		--batch_size=2 --input_size=256,256 --config.model.base_width=64
	$(ACCEL_BENCH) --config=configs/unet.py $(RGB) --name=b_width16_352x480 \
		--batch_size=4 --input_size=352,480 --config.model.base_width=16
	$(ACCEL_BENCH) --config=configs/unet.py $(RGB) --name=gpu_w64_256px_b8_f32 \
		--batch_size=8 --input_size=256,256 --config.model.base_width=64
	$(ACCEL_BENCH) --config=configs/unet.py $(RGB) --name=gpu_w64_256px_b8_bf16 \
		--batch_size=8 --input_size=256,256 --config.model.base_width=64 \
		--config.model.dtype=bfloat16

clean-venv:
	rm -rf $(VENV)
