# The README's two commands: `make demo` and `make test`. Each creates .venv when missing and installs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fulltune-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow bench lint install clean gpu-wheels gpu-check-dry

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[demo,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fulltune demo --output_dir outputs/demo

# The suite CI runs (tests marked slow, such as the README's blocks in a fresh clone, are `make test-slow`): one
# worker per core (pytest-xdist, a test file per worker), each on one thread so that the workers do not wait on
# each other's spinning OpenMP threads.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x --durations=15 -m "not slow" -n auto --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m slow

bench: $(STAMP)
	$(PY) bench/vs_hf_trainer.py

# What bench/gpu_check.sh installs on a GPU machine that reaches no registry (43 MB: fetched, not committed).
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d bench/wheels \
		bitsandbytes==0.50.2 torchao==0.18.0 pytest pluggy iniconfig pygments tomli exceptiongroup

gpu-check-dry: $(STAMP)
	PYTHON=$(PY) bash bench/gpu_check.sh --dry-run outputs/gpu_check_dry

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf outputs .pytest_cache
