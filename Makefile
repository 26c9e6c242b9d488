# Two commands do all the set-up on a fresh machine that has only Python:
#   make demo   simulate scenarios/quickstart.toml, the default job (plot and trace under out/)
#   make test   run the test suite (make test-all: with the slow, real-host tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench validate validate-gpu wheelhouse published clean

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

bench: $(STAMP)   # one line of JSON on stdout (issue 18's figures); the executor's table on stderr
	@$(BIN)/python benchmarks/bench_sim.py
	@$(BIN)/python benchmarks/bench_executor.py >&2

validate: $(STAMP)
	$(BIN)/python scenarios/validation/run.py

# A GPU host (1-8 GPUs, CuPy installed): calibrate its GPUs and validate a small suite.
# Exit 0 with one line when no GPU is visible (scenarios/validation/gpu.py).
validate-gpu: $(STAMP)
	$(BIN)/python scenarios/validation/gpu.py

# Wheels for an offline host: this project and every dependency (mpich's MPI included),
# for WHEEL_PYTHON (default: this venv's) on Linux x86-64.  There:
#   pip install --no-index --find-links wheelhouse clustersim   (CuPy: the host's own)
WHEEL_PYTHON ?= $(shell $(BIN)/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null)
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64
wheelhouse: $(STAMP)
	rm -rf wheelhouse
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir wheelhouse . && rm -rf build
	$(BIN)/python -m pip download --quiet --dest wheelhouse --only-binary=:all: --python-version $(WHEEL_PYTHON) \
		$(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) 'setuptools>=77' \
		$$($(BIN)/python -c 'import tomllib; print(" ".join(d.replace(" ", "") for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
	@ls wheelhouse | wc -l | xargs printf '%s wheels in wheelhouse/ for Python $(WHEEL_PYTHON)\n'

published: $(STAMP)   # the cases in as many processes as this machine has cores
	$(BIN)/clustersim published --plot out/published.png --jobs $$($(BIN)/python -c 'import os; print(os.cpu_count() or 1)')

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
