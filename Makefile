# Two entry points (see README): `make demo` and `make test`.
# Each creates the virtual environment it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: setup demo test bench clean

$(BIN)/jaxrec: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/jaxrec

# On the embedded synthetic data: train a shallow NextItNet, grow it 2x
# (StackRec), fine-tune, train the deep one from scratch too, and print the
# test metrics of all three next to the popularity baseline.
demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/python experiments/demo.py --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal --durations=15 tests

bench: setup
	$(BIN)/python experiments/bench_train.py

clean:
	rm -rf $(VENV) runs
