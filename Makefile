# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= .demo
DEMO_ARGS ?=
# the suite on both cores, in the random order pytest-randomly draws; its seed is printed first, and
# make test TEST_ARGS="-n 2 --dist loadfile -p randomly --randomly-seed=N" runs that order again
TEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo demo-flow demo-morl demo-rounds demo-lcm-epsilon demo-draft test install clean-demo

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	DS_BUILD_OPS=0 $(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(TEST_ARGS) tests

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --work_dir $(DEMO_DIR) $(DEMO_ARGS)

demo-flow: $(STAMP)  # only the flow-matching RL part (make demo runs it too)
	$(BIN)/python scripts/demo.py --work_dir .demo --part flow

demo-morl: $(STAMP)  # only the multi-objective RL part and what it needs (make demo runs it too)
	$(BIN)/python scripts/demo.py --work_dir .demo --part morl

demo-rounds: $(STAMP)  # two rounds of the data loop with a simulated annotator (and what they need)
	$(BIN)/python scripts/demo.py --work_dir .demo --part rounds

demo-lcm-epsilon: $(STAMP)  # LCM distillation of an epsilon-prediction teacher (what distillation buys; and what it needs)
	$(BIN)/python scripts/demo.py --work_dir .demo --part lcm_epsilon

demo-draft: $(STAMP)  # direct reward fine-tuning (DRaFT, AlignProp on the 4-step student) beside GRPO and RG-LCD (and what it needs)
	$(BIN)/python scripts/demo.py --work_dir .demo --part draft

clean-demo:
	rm -rf .demo
