# Two commands do all the set-up on a fresh CPU machine:
#   make smoke   - create .venv, install the CPU stack, run the smoke experiment
#   make test    - same install, then the whole test suite (slow tests included)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install smoke test bench docs clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off torch==2.13.0   # the CPU wheel; must come first
	$(BIN)/pip install --quiet --progress-bar off -e ".[train,server-cpu,test]"
	@# CUDA-linked builds that break vLLM on CPU; triton has no CPU backend (1 GB unused).
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

install: $(STAMP)

smoke: install
	$(BIN)/python -m coordexp.train +experiment=smoke/ab_mixed

test: install
	$(BIN)/python -m pytest

bench: install
	for f in tests/benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

docs: install
	$(BIN)/python -m coordexp.config.reference > docs/config.md

clean:
	rm -rf $(VENV) runs multirun .cache
