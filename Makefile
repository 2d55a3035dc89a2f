# resunetpp: `make demo` and `make test` work on a fresh machine (they create .venv first).
#
#   make install       .venv with torch==$(TORCH_VERSION) first, then the toolkit -e .[cpu,dev]
#   make test          install, then the test suite
#   make demo          install, then `resunetpp info` and `resunetpp bench` on the shipped model and images,
#                      and `resunetpp infer` on the sample clip (runs/demo/video)
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
	$(VENV)/bin/resunetpp infer default resunetpp/sample_data/clip.mp4 --out runs/demo/video --save-masks

# The shipped model in two stages, as it was made: 21 epochs from scratch, then 70 epochs of
# fine-tuning from them (a new warm-up + cosine schedule), both on the 256 px cache. Each stage
# resumes when its folder already holds a run (interrupt with Ctrl-C, run `make train-kvasir`
# again). About 10 min on an H200; on a 2-core CPU about 1.5 s per image (~33 h).
RESUNETPP := $(VENV)/bin/resunetpp
stage = if [ -f $(2)/train_state.pt ]; then $(RESUNETPP) train --out $(2) --resume; \
	else $(RESUNETPP) train --data runs/kvasir256 --out $(2) --range-reg 0.1 $(1); fi

train-kvasir: install
	@test -d runs/kvasir256 || $(PY) scripts/make_train_cache.py $(KVASIR) runs/kvasir256
	$(call stage,--epochs 21,runs/kvasir-stage1)
	$(call stage,--epochs 70 --init-from runs/kvasir-stage1/last.safetensors,runs/kvasir)

clean:
	rm -rf $(VENV) build dist *.egg-info
