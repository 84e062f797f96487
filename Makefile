# The README's two commands. Each works on a fresh clone: it makes .venv, installs, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= quickstart-out
PIP_FLAGS ?= -q
# DeepSpeed builds no CUDA ops on the CPU path; it picks its CPU accelerator itself.
export DS_BUILD_OPS := 0

.PHONY: demo test install clean

$(VENV)/.installed: setup.py constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints-cpu.txt "torch==2.13.0"
	$(PY) -m pip install $(PIP_FLAGS) -c constraints-cpu.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/flexmoe quickstart out_dir=$(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(OUT)
