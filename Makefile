# terarec: `make train` and `make test` work on a fresh machine (they install first).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.terarec-installed
CONFIG ?= configs/quickstart.yaml

.PHONY: install train test test-all lint bench clean

$(STAMP): setup.py requirements-cpu.txt
	bash scripts/install.sh "$(PY)" "$(VENV)"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/terarec train --config $(CONFIG)

test: $(STAMP)
	$(VPY) -m pytest -q tests

test-all: $(STAMP)
	$(VPY) -m pytest -q -m "" tests

lint: $(STAMP)
	$(VPY) -m ruff check terarec tests benchmarks

bench: $(STAMP)
	$(VPY) benchmarks/train_cpu.py

clean:
	rm -rf runs build *.egg-info
