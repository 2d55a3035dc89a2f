# resunetpp: `make demo` and `make test` work on a fresh machine (they create .venv first).
#
#   make install       .venv with torch==$(TORCH_VERSION) first, then the toolkit -e .[cpu,dev]
#   make test          install, then the test suite
#   make demo          install, then `resunetpp info` and `resunetpp bench` on the shipped model and images
#   make train-kvasir  reproduce the shipped Kvasir-SEG model (needs ../shared/data/kvasir-seg)
#   make clean         remove .venv and build leftovers
#
# TORCH_INDEX: an extra index for the torch wheel, e.g. https://download.pytorch.org/whl/cpu on a
# machine whose pip would otherwise pick PyPI's multi-GB CUDA build. Empty: pip's own config.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
KVASIR      ?= ../shared/data/kvasir-seg

PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
STAMP := $(VENV)/.resunetpp-installed

.PHONY: install test demo train-kvasir clean

install: $(STAMP)

# Re-run only when the venv is missing or pyproject.toml changed; a second `make test` is instant.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e ".[cpu,dev]"
	@$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; \
	  sys.exit(0 if v == '$(TORCH_VERSION)' else f'torch {torch.__version__} replaced $(TORCH_VERSION)')"
	@touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/resunetpp info
	$(VENV)/bin/resunetpp bench --json runs/demo/bench.json --markdown runs/demo/bench.md --plot runs/demo/bench.png

train-kvasir: install
	$(VENV)/bin/resunetpp train --data $(KVASIR) --out runs/kvasir --epochs 200 --range-reg 0.1

clean:
	rm -rf $(VENV) build dist *.egg-info
