PYTHON ?= python3
VENV := .venv
LOCK := requirements.lock
FMNIST_FILE := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: venv install lock data demo gpu-check test lint docs clean

venv install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Install the tested versions pinned in the lock file; re-install only when the lock file or the package metadata
# changes (the source is installed in editable mode).
$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK) | $(VENV)/bin/python
	$(VENV)/bin/pip install -c $(LOCK) -e '.[dev]'
	touch $@

# Regenerate the lock file from setup.cfg's ranges with pip-tools, keeping the pins that still fit them;
# `make lock LOCK_ARGS=--upgrade` moves every pin to the newest release in range. `make install` then applies it.
LOCK_ARGS ?=
lock: install
	$(VENV)/bin/pip-compile --all-extras --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		$(LOCK_ARGS) -o $(LOCK) setup.cfg

data:
	@if [ -z "$$FASHION_MNIST_DIR" ] && [ ! -f $(FMNIST_FILE) ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
		else \
			echo "Fashion-MNIST not found ($(FMNIST_FILE))." >&2; \
			echo "Install it with 'sudo apt-get install dataset-fashion-mnist'," >&2; \
			echo "or set FASHION_MNIST_DIR to a folder holding the four IDX .gz files." >&2; \
			exit 1; \
		fi; \
	fi

# The main job on the embedded default (prance_fmnist on Fashion-MNIST): fine-tune the shipped PPO selector briefly,
# calibrate it to a few MACs budgets, evaluate it against the baselines, draw the token maps; prints the table.
DEMO ?= runs/demo
DEMO_STEPS ?= 100000
# the price evaluate.py calibrated to the budget nearest 0.5 (read when a recipe line runs)
DEMO_PRICE = $$($(VENV)/bin/python -c "import json; rows = json.load(open('$(DEMO)/results.json'))['table']; \
	print(min((r for r in rows if 'budget' in r), key=lambda r: abs(r['budget'] - 0.5))['price'])")

demo: venv data
	$(VENV)/bin/python scripts/train_selector.py --init shipped:prance_fmnist --total-steps $(DEMO_STEPS) \
		--eval-every $(DEMO_STEPS) --out $(DEMO)/selector
	$(VENV)/bin/python scripts/evaluate.py --selector $(DEMO)/selector/selector --out $(DEMO) --threads 1
	$(VENV)/bin/python scripts/visualize.py --selector $(DEMO)/selector/selector --out $(DEMO) --price $(DEMO_PRICE)
	$(VENV)/bin/python scripts/visualize.py --selector $(DEMO)/selector/selector --out $(DEMO) --price $(DEMO_PRICE) \
		--stats --threads 1
	@echo; echo "== $(DEMO)/results.md (plots: $(DEMO)/pareto.png, $(DEMO)/tokens.png, $(DEMO)/decisions.png) =="
	@cat $(DEMO)/results.md

# The whole chain on a CUDA machine in at most about 8 minutes (DeiT-Small shapes, generated 224-px ImageFolder):
# supernet training (DDP over every GPU), env speed, PPO, calibration, evaluate.py, benchmark.py fp32 and bf16.
GPU_CHECK ?= runs/gpu_check
gpu-check: venv
	$(VENV)/bin/python scripts/gpu_check.py --out $(GPU_CHECK)

lint: venv
	$(VENV)/bin/ruff check .

test: lint data
	$(VENV)/bin/python -m pytest -n auto --dist worksteal

# The docs (docs/*.md) as a static site in site/, warnings as errors
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
