# One command per task. `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# One process per GPU, or 2 CPU processes (gloo) when there is no GPU. Expanded after install.
NPROC = $(shell $(PY) -c "import torch; print(torch.cuda.device_count() or 2)")
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test lint format clean

# --system-site-packages: on GPU machines the preinstalled CUDA torch is used as is; elsewhere the
# pinned CPU build is installed.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install  ## demo: a small GPT on the stdlib sources, DDP over all GPUs or 2 CPU processes
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m launcher experiment=demo $(ARGS)

# Two pytest workers: most tests wait on process start-up, rendezvous and sleeps, so two overlap well
# even on 2 cores. Tests sharing the Slurm cluster and the namespace nodes stay on one worker.
test: install  ## the whole suite (unit, multi-process gloo, CLI integration)
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check launcher recipes tests bench
	$(VENV)/bin/ruff format --check launcher recipes tests bench

format: install
	$(VENV)/bin/ruff format launcher recipes tests bench
	$(VENV)/bin/ruff check --fix launcher recipes tests bench

clean:
	rm -rf $(VENV) runs multirun .pytest_cache
