# gradserve: `make serve` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the local CPU wheel; GPU machines override (or pre-install) their own.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 50051
PROTO_OUT ?= client

.PHONY: install serve test bench proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[server,jax,dev]"
	touch $@

serve: install
	$(VENV)/bin/gradserve serve gradserve.server.models.digits:endpoints --host $(HOST) --port $(PORT)

test: install
	$(PY) -m mypy
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/small_calls.py
	$(PY) benchmarks/many_clients.py

# Regenerates the committed stubs; tests/test_proto.py checks they are current.
proto:
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) proto/gradserve/v1/gradserve.proto

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info
