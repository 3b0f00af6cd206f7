# worldstream — set-up, demo and tests. Everything installs into a local virtualenv (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned: on a CPU-only machine this takes the CPU build; the range in pyproject.toml then
# installs nothing more. Set TORCH_SPEC= (empty) to keep a torch that is already installed.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= mg2/universal_tiny
BLOCKS ?= 10
OUT ?= out/demo.mp4

.PHONY: setup protos lint-protos demo play test test-unit test-e2e test-compose base-image golden batch bench-wire bench-loop clean

setup: $(VENV)/.installed

# Both distributions, editable: client/ (worldstream-client) and services/ (worldstream-services, which needs
# the client). Installing the client generates the worldstream.v1 modules from protos/.
$(VENV)/.installed: client/pyproject.toml client/setup.py services/pyproject.toml $(wildcard protos/worldstream/v1/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ./client -e './services[test]'
	touch $@

# Regenerate the worldstream.v1 modules after editing protos/ (setup does it when a .proto is newer).
protos: setup
	$(PY) -m pip install -q --no-deps -e ./client

# buf lint of the worldstream.v1 protos (buf.yaml); needs node/npm for the buf binary.
lint-protos:
	npx --yes @bufbuild/buf lint

# Both services + the client on the tiny CPU config; writes $(OUT).
demo: setup
	$(VENV)/bin/worldstream demo --config $(CONFIG) --blocks $(BLOCKS) --out $(OUT)

# Both services + the browser gateway on the tiny CPU config; prints the URL of the play page (Ctrl-C stops).
play: setup
	$(VENV)/bin/worldstream play --config $(CONFIG)

# The unit suite, then the slower end-to-end checks (tests/e2e: fresh wheel installs, the browser, the services
# benchmark), each a pytest run of its own.
test: test-unit test-e2e

test-unit: setup
	$(PY) -m pytest -q

test-e2e: setup
	$(PY) -m pytest -q tests/e2e

# The CPU deployment (deploy/docker-compose.cpu.yml) under a real Docker engine, end to end; starts dockerd if
# none runs (and stops it after), as root installs docker.io and mmdebstrap if missing. See tests/compose/run.sh.
test-compose: setup
	TORCH_SPEC="$(TORCH_SPEC)" tests/compose/run.sh $(PY)

# The base of the CPU image, built locally (no image registry): Debian minbase + python3 + the CPU torch wheel
# that pip here resolves for $(TORCH_SPEC). Needs a running Docker engine and mmdebstrap.
base-image: setup
	TORCH_SPEC="$(TORCH_SPEC)" deploy/base-image.sh $(PY)

golden: setup
	$(VENV)/bin/worldstream golden ../shared/golden/*.safetensors

batch: setup
	$(VENV)/bin/worldstream batch --config $(CONFIG) --blocks $(BLOCKS) --out out/batch.mp4 --overlay

bench-wire: setup
	$(PY) benchmarks/wire_codec.py

bench-loop: setup
	$(PY) benchmarks/block_loop.py --config $(CONFIG)

clean:
	rm -rf $(VENV) out build client/build services/build */*.egg-info client/worldstream/v1/*_pb2*.py*
