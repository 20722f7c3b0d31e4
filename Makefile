# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench lint format clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel this machine carries: a looser pin would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[ui,train,eval,deploy,dev]"
	# DeepSpeed for the ZeRO-2/3 tests (its CPU backend runs on gloo): a pure-Python sdist whose setup imports
	# torch, hence no build isolation. Optional for users (slimsd runs without it, no ZeRO); `make test` fails
	# without it (its ZeRO tests must run).
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed==0.19.8" || \
	  echo "slimsd: deepspeed is not installable here: slimsd works without it (no ZeRO), make test will fail"
	# torch-fidelity: an independent FID Inception the tests compare slimsd's with, output for output. Without
	# its dependencies: it lists torchvision, which has no build for this torch; the module used needs none.
	$(BIN)/python -m pip install -q --no-deps "torch-fidelity==0.4.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/slimsd demo

# One torch thread per process: the micro models are too small to gain from more, and the tests that start
# servers or several ranks would otherwise oversubscribe the cores (measured: 8 micro-sd steps took 154 s
# with default threads and 17 s with one, on a loaded 2-core machine). Two pytest workers, one per core of the
# CI machine (pytest-xdist), the longest tests first, the multi-process ones on one worker (tests/conftest.py):
# 21.7 min in one process at stop 19.
TEST_WORKERS ?= 2
# A skipped test fails here (SLIMSD_NO_SKIPS=1, tests/conftest.py): only gpu tests may skip, on machines
# without CUDA; a missing DeepSpeed or Chromium fails the run instead of hiding the tests that need them.
test: $(STAMP) browser
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)" || \
	  { echo "make test: deepspeed is missing (make install could not install it); the ZeRO tests need it" >&2; \
	    exit 1; }
	SLIMSD_NO_SKIPS=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -m "not gpu" \
	  -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The web UI test drives Debian's Chromium (via Playwright); install it once, only where we may (root + apt).
# Without it `make test` stops here: the browser test must run.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
	  { echo "make test: /usr/bin/chromium is missing, not installable here (root + apt-get): the browser test" \
	    "needs it" >&2; exit 1; }

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not browser" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_step_latency.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks scripts
	$(BIN)/ruff format src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
