# The two commands: `make demo` and `make test` set up .venv on first use (Python 3.11 + pip).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.candorlm-installed
# The web chat's browser tests drive Debian's chromium through Playwright (Playwright's own
# browser download does not work offline); installed when missing, which needs root and apt.
CHROMIUM := /usr/bin/chromium
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo test bench setup clean

setup: $(STAMP) $(CHROMIUM)

# llama-cpp-python (the tests' llama.cpp) builds llama.cpp for this CPU (-march=native). On x86
# its AMX kernels are left out: on Xeons with AMX they stop the process with an illegal
# instruction (tile instructions in threads the kernel has not enabled them for), and they
# serve only the quantized types' batched matmuls. Appended to any CMAKE_ARGS of your own.
AMX_OFF := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS := $(CMAKE_ARGS) -DCMAKE_C_FLAGS='$(AMX_OFF)' -DCMAKE_CXX_FLAGS='$(AMX_OFF)'
else
LLAMA_CMAKE_ARGS := $(CMAKE_ARGS)
endif

# Reinstalled when pyproject.toml changes. torch is pinned to 2.13.0 in pyproject.toml
# (a plain `torch` pulls a multi-GB CUDA build on CPU machines).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "the web chat tests need $(CHROMIUM): run 'apt-get install chromium' as root"; fi

demo: $(STAMP)
	$(BIN)/candor run --name demo

# PASSIVE: idle OpenMP threads sleep instead of spinning, so the tests' concurrent
# processes (torchrun ranks, curation workers) do not starve each other on 2 cores.
test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check candorlm tests bench
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -p no:cacheprovider

# Every benchmark once; the speedrun in its quick form (the full one takes ~26 min:
# `$(BIN)/python bench/speedrun.py`).
bench: $(STAMP)
	@for b in bench/*.py; do \
	  case $$b in bench/speedrun.py) args=--quick;; bench/train_throughput.py) args=--ddp;; *) args=;; esac; \
	  echo "== $$b $$args"; $(BIN)/python $$b $$args || exit 1; done

clean:
	rm -rf runs .pytest_cache
