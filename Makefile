# The user's entry point. Every target works from a fresh clone with nothing installed by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export DAGSTER_HOME := $(abspath dagster_home)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-fast lint bench bench-harness bench-method bench-models bench-incremental bench-ray bench-scale demo validate ui demo-data gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_C) -e '.[test]'
	touch $@

# Everything CI runs: lint, the layer contracts (pyproject.toml [tool.importlinter]) and every test, in random
# order (each test owns its state).
test: lint
	$(PY) -m pytest -q -p random_order --random-order

# The edit loop: the tests not marked slow (no model training, no Dagster runs).
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

# Method-core speed: greedy envelopes (G=2,000 and 20,000 x 57) and the hierarchy (100k and 1M x 384).
bench-method: setup
	mkdir -p reports
	$(PY) benchmarks/greedy_speed.py --json reports/greedy_speed.json
	$(PY) benchmarks/greedy_kernel.py --json reports/greedy_kernel.json --markdown docs/benchmark/greedy_kernel.md
	$(PY) benchmarks/hierarchy_speed.py --sizes 100000,1000000 --json reports/hierarchy_speed.json

# Model layer: embedder throughput against the bare forward.
bench-models: setup
	mkdir -p reports
	$(PY) benchmarks/embedder_throughput.py --json reports/embedder_throughput.json

# The demo data and base model under $HARP_DEMO_DIR, else $(DAGSTER_HOME)/demo (a cache: rebuilt only when its configuration changes).
DEMO_POOL ?= 20000
DEMO_SEED ?= 0
DEMO_BUILD_FLAGS ?=
demo-data: setup
	$(PY) -m harp_demo.build --out "$${HARP_DEMO_DIR:-$(DAGSTER_HOME)/demo}" --pool-size $(DEMO_POOL) \
		--seed $(DEMO_SEED) $(DEMO_BUILD_FLAGS)

# Build the demo, then `harp-dagster run` on its files (pool, eval set, base model; the default budget) into
# DAGSTER_HOME, with progress bars, and print the summary (selections, utilities, runs, timings, event log).
# The runs show under their jobs in `make ui`; Dagster's event lines go to dagster_home/logs/.
demo: setup
	$(PY) -m harp_demo.run --pool-size $(DEMO_POOL) --seed $(DEMO_SEED)

# The validation group on the demo, after the main job: measure every leaf (the exhaustive oracle), then
# finetune on each selection and the full pool and score the held-out test split.
validate: setup
	$(PY) -m harp_demo.run --validate --pool-size $(DEMO_POOL) --seed $(DEMO_SEED)

# The selection-quality and cost benchmark: HARP-C/E, active rounds, exhaustive oracle, LESS, TSDS, random and the
# full pool over 3 seeds at the 1/7 budget, each selection validated on 3 LoRA seeds; the report (committed, quoted
# by the README) in docs/benchmark/. The budget sweep: BENCH_FLAGS="--budgets 14,7,3 --main 7"; a quick look:
# BENCH_FLAGS="--pool-size 2000 --seeds 0 --budgets 7". Leaves, validations and seeds are cached, so a run resumes.
BENCH_FLAGS ?= --budgets 7 --main 7
bench: setup
	$(PY) -m benchmarks.quality.run --out docs/benchmark $(BENCH_FLAGS)

# The offline harness (docs/benchmark.md#offline-harness): every leaf of the benchmark's seeds measured (cached with
# `make bench`'s), then each method variant fitted on half of the proxy questions and scored on the other half
# against the exhaustive oracle. Report: docs/benchmark/harness.md and .json. Run it alone.
bench-harness: setup
	$(PY) -m benchmarks.quality.run --out docs/benchmark --measure-only $(BENCH_FLAGS)
	$(PY) -m benchmarks.quality.harness --cache docs/benchmark/cache --splits 5 --budget 7 \
		--json docs/benchmark/harness.json --markdown docs/benchmark/harness.md

# Incremental re-selection: a full run on the demo, then 3 growths of 10% (new pool files), each re-run against a
# from-scratch run on the same pool: leaves trained, wall time, validated accuracy over 3 seeds. The report
# (committed, quoted by the README) is docs/benchmark/incremental.md; working files go to reports/incremental/.
bench-incremental: setup
	$(PY) -m benchmarks.incremental --out docs/benchmark/incremental

# A pool of 100,000, 300,000 and 1,000,000 examples through every stage that does not train (embeddings from a
# file, hierarchy and stable leaf ids, a 1% growth, posteriors, both envelopes, TSDS exact and IVF, the lineage
# tables and catalog views): seconds and peak memory per stage, and growth exponents that flag anything
# superlinear. The report (committed) is docs/benchmark/scale.md and .json. Run it alone: about 10 GiB of RAM
# and 4 GB of disk under reports/scale/ (removed after). SCALE_FLAGS: e.g. --sizes 100000,300000 --tsds exact.
SCALE_FLAGS ?=
bench-scale: setup
	$(PY) -m benchmarks.scale_pool --out docs/benchmark/scale $(SCALE_FLAGS)

# Leaf training on Ray: leaves per minute in process (1 and 2 threads) and on 1 and 2 Ray actors, and Ray's
# overhead per leaf (docs/benchmark/ray.md, committed). Run it alone.
bench-ray: setup
	$(PY) -m benchmarks.ray_leaves --out docs/benchmark/ray

# The GPU checks (docs/scale-out.md#the-gpu-check): one line per check, within 8 minutes; without CUDA the CPU
# variants run and the GPU-only check is skipped. GPU_CHECK_FLAGS: e.g. --require-gpu, --only faiss,vllm.
GPU_CHECK_FLAGS ?=
gpu-check: setup
	PYTHON=$(PY) bash scripts/gpu_check.sh $(GPU_CHECK_FLAGS)

# The Dagster UI on the demo, bound to loopback. `exec` under a launcher that restores default SIGINT/SIGTERM
# handling: a shell started without a terminal leaves them ignored, and then Ctrl-C would not stop dagster.
PORT ?= 3000
ui: demo-data
	exec $(PY) -c 'import os, signal, sys; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)]; os.execv(sys.argv[1], sys.argv[1:])' \
		$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)
