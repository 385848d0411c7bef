# Quick start targets; see README.md.
PYTHON ?= python3
export PYTHON

.PHONY: setup demo test test-slow cuda-check bench

setup:
	bash tools/setup.sh

# The main job on the shipped default model and images.
demo: setup
	nchains extract --classes sneaker,ankle-boot --per-class 10 --out chain.json

# The default test suite (slow tests run separately: make test-slow).
test: setup
	$(PYTHON) -m pytest -q

test-slow: setup
	$(PYTHON) -m pytest -q -m slow

cuda-check:
	bash tools/check_cuda_build.sh

bench: setup
	$(PYTHON) tools/bench_ops.py
