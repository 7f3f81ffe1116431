# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv on first use.
# TARGET=gpu (setup, build, serve) runs inside the TensorRT-LLM Triton container with its Python
# and its own default OUT, so a GPU build never overwrites the CPU one.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
TARGET ?= cpu
# the container's server (TARGET=gpu)
TRITONSERVER ?= /opt/tritonserver/bin/tritonserver
ifeq ($(TARGET),gpu)
PY ?= python3
STAMP := .gpu-installed
OUT ?= artifacts/build-gpu
else
PY := .venv/bin/python
STAMP := .venv/.installed
OUT ?= artifacts/build
endif

MODEL ?= artifacts/checkpoints/tiny-qwen3
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# the OpenAI-compatible API (openai_api/) next to tritonserver; OPENAI_PORT=0 serves Triton alone
OPENAI_PORT ?= 9000

.PHONY: setup gpu-container test demo build serve bench bench-components bench-peers deploy-manifests clean

setup: $(STAMP)

.venv/.installed: pyproject.toml
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU build) resolves to the file on this machine's disk; see pyproject.toml
	.venv/bin/python -m pip install -q -e '.[cpu,test]'
	# guided decoding's xgrammar without the GPU compiler it declares (pyproject.toml, `cpu`)
	.venv/bin/python -m pip install -q --no-deps xgrammar==0.2.9
	# the CPU LLM's kernels (int8 weights, fused norm/rotary: engine/llm/cpu_ops.py), compiled once here, not at first use
	.venv/bin/python -m engine.llm.cpu_ops
	touch $@

# TARGET=gpu pip-installs into $(PY): only where that is the container's Python (tensorrt_llm
# importable, the container's tritonserver present), never into whichever python3 is first elsewhere.
gpu-container:
	@[ -x "$(TRITONSERVER)" ] || { echo "TARGET=gpu runs inside nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3 (docs/GPU.md); $(TRITONSERVER) is missing here: start the container, or leave TARGET unset for the CPU build" >&2; exit 1; }
	@$(PY) -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("tensorrt_llm") is None)' 2>/dev/null \
	|| { echo "TARGET=gpu installs into and runs with the container's Python, which has tensorrt_llm; $(PY) has none: set PY= to the container's python3" >&2; exit 1; }

.gpu-installed: pyproject.toml | gpu-container
	$(PY) -m pip install -q --extra-index-url https://pypi.nvidia.com -e '.[gpu,test]'
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m client.demo

# The default MODEL is the generated tiny checkpoint, made on first use by $(1), a Python with the project.
default_checkpoint = [ "$(MODEL)" != "artifacts/checkpoints/tiny-qwen3" ] || $(1) -m build.checkpoint --preset tiny --llm qwen3 --out $(MODEL) >/dev/null

# BUILD_ARGS adds flags (python -m build.repository --help), e.g. BUILD_ARGS="--tp-size 2 --llm-gpus 1,2" for TARGET=gpu.
build: setup
	@$(call default_checkpoint,$(PY))
	$(PY) -m build.repository --model $(MODEL) --out $(OUT) --target $(TARGET) $(BUILD_ARGS)

# Serving benchmark (concurrency sweep) against a tritonserver started from OUT; BENCH_ARGS adds flags.
bench: build
	$(PY) -m client.bench --out $(OUT) --results artifacts/bench $(BENCH_ARGS)

# Component speed ratios (preprocess, vision encoder, LLM decode, Triton TTFT overhead) in one run.
bench-components: setup
	$(PY) -m bench_components --out artifacts/bench $(BENCH_ARGS)

# Decode tok/s of our LLM engine against llama.cpp per weight precision (fp32/f32, fp16/f16, int8/q8_0),
# interleaved, on the generated Qwen3-0.6B shape. Optional (not in `make test`): the first run installs
# the `peers` extra into .venv, compiling llama.cpp for this CPU (several minutes); CPU only, no BLAS.
PEERS_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF
.venv/.peers-installed: pyproject.toml | .venv/.installed
	CMAKE_ARGS="$(PEERS_CMAKE_ARGS)" .venv/bin/python -m pip install -q --no-binary llama-cpp-python -e '.[peers]'
	touch $@

# decode against llama.cpp (BENCH_ARGS), then whole requests against llama-server with AIPerf
# (REQUESTS_ARGS: python -m bench_components.peers_requests --help); the first run builds llama-server
# and AIPerf's venv under artifacts/bench/peers (minutes), later runs reuse them
bench-peers: setup .venv/.peers-installed
	.venv/bin/python -m bench_components.peers --out artifacts/bench $(BENCH_ARGS)
	.venv/bin/python -m bench_components.peers_requests $(REQUESTS_ARGS)

SERVER := $(if $(filter gpu,$(TARGET)),launcher.gpu --tritonserver $(TRITONSERVER),launcher.server)
serve: setup
	$(PY) -m $(SERVER) --out $(OUT) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --openai-port $(OPENAI_PORT)

# Kubernetes manifests (OUT/k8s/*.yaml) for MODEL, with the same TARGET and BUILD_ARGS as `make build`;
# DEPLOY_ARGS adds manifest flags (python -m build.manifests --help), e.g. --image, --replicas.
# Written with the CPU environment for either TARGET: no GPU is needed to describe a GPU deployment.
deploy-manifests: .venv/.installed
	@$(call default_checkpoint,.venv/bin/python)
	.venv/bin/python -m build.manifests --model $(MODEL) --out $(OUT) --target $(TARGET) $(BUILD_ARGS) $(DEPLOY_ARGS)

clean:
	rm -rf artifacts .pytest_cache .gpu-installed
