# One place for the steps of the README's two commands; CI runs `make test` through .ci/run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := libegl1 libegl-mesa0 libgl1-mesa-dri libassimp5 assimp-testmodels

.PHONY: system-deps install test demo clean

# Headless OpenGL (Mesa EGL, llvmpipe on CPU) for rendering, assimp for FBX, DAE, 3DS, ... (with
# libdraco for Draco-compressed glTF), and the assimp test models for tests.
system-deps:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that pip takes the CPU build and never pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: system-deps $(VENV)/.installed

test: install
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/coherendream demo

clean:
	rm -rf $(VENV) outputs
