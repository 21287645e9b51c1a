# Two entry points, each doing its own set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-crash install bench clean chromium

# torch/torchvision are pinned to the releases this project is tested with (they install from local disk here).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,demo,bench,report,serve]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/imgindex demo

# The browser test drives Debian's chromium (Playwright without its own browsers). As root (as in CI) it is installed
# when missing; otherwise that test is skipped with its reason.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium with apt-get for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
			|| echo "could not install chromium: the browser test will be skipped"; \
	fi

test: $(STAMP) chromium
	$(PY) -m pytest --durations=15

# The job killed after every one of its writes to OUT, then run again (`make test` cuts after one write of each kind).
test-crash: $(STAMP)
	IMGINDEX_CRASH_EVERY_WRITE=1 $(PY) -m pytest tests/test_crash.py --durations=5 -s

bench: $(STAMP)
	$(PY) bench/embed.py

clean:
	rm -rf demo-out demo-data .pytest_cache
