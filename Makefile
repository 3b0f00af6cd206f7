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

.PHONY: setup protos lint-protos demo test golden batch bench-wire bench-loop clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import worldstream.v1 as v1; v1.generate(force=True)"
	touch $@

protos: setup
	$(PY) -c "import worldstream.v1 as v1; v1.generate(force=True)"

# buf lint of the worldstream.v1 protos (buf.yaml); needs node/npm for the buf binary.
lint-protos:
	npx --yes @bufbuild/buf lint

# Both services + the client on the tiny CPU config; writes $(OUT).
demo: setup
	$(PY) -m worldstream.launch --config $(CONFIG) --blocks $(BLOCKS) --out $(OUT)

test: setup
	$(PY) -m pytest -q

golden: setup
	$(VENV)/bin/worldstream-golden ../shared/golden/*.safetensors

batch: setup
	$(VENV)/bin/worldstream-batch --config $(CONFIG) --blocks $(BLOCKS) --out out/batch.mp4 --overlay

bench-wire: setup
	$(PY) benchmarks/wire_codec.py

bench-loop: setup
	$(PY) benchmarks/block_loop.py --config $(CONFIG)

clean:
	rm -rf $(VENV) out build *.egg-info worldstream/v1/*_pb2*.py*
