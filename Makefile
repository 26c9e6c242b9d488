# Two commands do all the set-up on a fresh machine that has only Python:
#   make demo   simulate the embedded default scenario (plot and trace under out/)
#   make test   run the test suite (make test-all: with the slow, real-host tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench validate published clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/clustersim simulate scenarios/quickstart.toml --plot out/quickstart.png --trace out/quickstart.trace.json

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sim.py
	$(BIN)/python benchmarks/bench_executor.py

validate: $(STAMP)
	$(BIN)/python scenarios/validation/run.py

published: $(STAMP)
	$(BIN)/clustersim published --plot out/published.png

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
