# Two entry points on a fresh machine:  `make demo`  and  `make test`.
# torch==2.13.0 is installed first: on these machines that CPU wheel lies on disk,
# and with it present the range in pyproject pulls nothing larger.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/ckpt-ledger
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-all chaos bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 numpy
	$(PY) -m pip install -q -e '.[test,plot,export,lightning,transformers,postgres]' torch==2.13.0
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf $(DEMO_DIR)
	$(CLI) train --run-dir $(DEMO_DIR) --stack fsdp --nproc 2
	$(CLI) inspect $(DEMO_DIR)

test: install
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider --durations=20

test-all: install
	$(PY) -m pytest -q -p no:cacheprovider

# Heavy fault soak: every slow test, many more kills and Hypothesis examples.
chaos: install
	CKPT_LEDGER_KILLS=3000 CKPT_LEDGER_CHAOS_KILLS=15 HYPOTHESIS_PROFILE=thorough \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_chaos.py tests/test_kill_loop.py tests/properties

# Benchmarks print ratios against baselines measured in the same run; results in bench/out/results.json.
bench: install
	$(PY) bench/run.py

bench-quick: install
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) runs bench/out
