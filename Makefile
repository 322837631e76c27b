PYTHON ?= python3
VENV := .venv
FMNIST_FILE := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: venv install data test lint clean

venv install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the package metadata changes; the source is installed in editable mode.
$(VENV)/.installed: setup.cfg pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

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

lint: venv
	$(VENV)/bin/ruff check .

test: lint data
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
