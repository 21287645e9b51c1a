# Two entry points, each doing its own set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install bench clean

# torch/torchvision are pinned to the releases this project is tested with (they install from local disk here).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,demo,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/imgindex demo

test: $(STAMP)
	$(PY) -m pytest --durations=15

bench: $(STAMP)
	$(PY) bench/embed.py

clean:
	rm -rf demo-out demo-data .pytest_cache
