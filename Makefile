# terarec: `make train` and `make test` work on a fresh machine (they install first).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.terarec-installed
RUN ?= runs/quickstart
REQUEST ?= examples/quickstart_request.json
CONFIG ?= configs/quickstart.yaml

.PHONY: install train test test-all test-numerics test-faults lint bench clean

$(STAMP): setup.py requirements-cpu.txt
	bash scripts/install.sh "$(PY)" "$(VENV)"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/terarec train --config $(CONFIG)
	$(VENV)/bin/terarec export --run $(RUN) --out $(RUN)/bundle --overwrite
	$(VENV)/bin/terarec score --bundle $(RUN)/bundle --request $(REQUEST)

test: $(STAMP)
	$(VPY) -m pytest -q tests

test-all: $(STAMP)
	$(VPY) -m pytest -q -m "" tests

# The float comparisons alone; CI also runs them with ATEN_CPU_CAPABILITY=avx2 and
# =default (docs/testing.md), which picks ATen's kernels at import.
test-numerics: $(STAMP)
	$(VPY) -c "import torch; print('ATen CPU capability:', torch.backends.cpu.get_cpu_capability())"
	$(VPY) -m pytest -q -m "numerics and not slow" tests

# The slow fault-injection tests (a 4-rank restart with SSD tiers); CI runs them too.
test-faults: $(STAMP)
	$(VPY) -m pytest -q -m "faults" tests

lint: $(STAMP)
	$(VPY) -m ruff check terarec tests benchmarks

bench: $(STAMP)
	$(VPY) benchmarks/train_cpu.py

clean:
	rm -rf runs build *.egg-info
