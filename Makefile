# Two entry points: `make demo` (set up + run the quickstart) and `make test` (set up + run the tests).
PYTHON ?= python3
DEMO_STEPS ?= 300

.PHONY: setup demo test bench lint soak

# torch first, pinned to the local CPU build, so nothing below resolves an unpinned torch to a multi-GB CUDA wheel.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pip install -q --no-deps "editscore==0.2"  # its prompts only; see the editscore extra in pyproject
	# DeepSpeed (learner.engine: deepspeed) from its sdist against the installed torch: no build isolation (that would
	# fetch an unpinned torch), no compiled ops (they are JIT-built on first use on GPUs).
	@$(PYTHON) -c "import deepspeed" 2>/dev/null || { $(PYTHON) -m pip install -q pydantic hjson py-cpuinfo ninja einops \
		&& DS_BUILD_OPS=0 $(PYTHON) -m pip install -q --no-deps --no-build-isolation "deepspeed==0.19.8"; }
	# Debian's Chromium for the replay viewer's headless-browser test (skipped only if it cannot be installed)
	@test -x /usr/bin/chromium || (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1)) \
		|| echo "chromium not installed: the viewer browser test will be skipped (and will fail under CI=true)"

demo: setup
	rm -rf runs/quickstart  # a fresh run each time (`editrl up` alone resumes a stopped run)
	$(PYTHON) -m editrl.scripts.cli up configs/quickstart.yaml --max-steps $(DEMO_STEPS)
	$(PYTHON) scripts/summarize_run.py runs/quickstart
	$(PYTHON) -m editrl.scripts.before_after configs/quickstart.yaml  # step 0 vs the last weights: figures + grid PNG

test: setup
	$(PYTHON) -m pytest -q -m "not slow"

bench: setup
	$(PYTHON) -m bench.bench_broker

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

# Chaos soak (slow, not in `make test`): 10 minutes of random kills/stops of broker, actors and scorers.
soak: setup
	mkdir -p runs/soak && EDITRL_SOAK_OUT=runs/soak/result.json $(PYTHON) -m pytest -q -s -m slow tests/faults/test_soak.py
