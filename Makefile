# ultrakv developer tasks. `make install` sets up a fresh machine (torch first: the pinned CPU
# build comes from local disk; a bare `torch` would pull several GB of CUDA packages).
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install proto test test-all lint run bench bench-gpu clean

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,bench]'

proto:
	$(PY) proto/generate.py

test:
	$(PY) -m pytest -q

lint:
	ruff check .

run:
	ultrakv serve

bench:  # the GPU comparison where CUDA is available, the CPU engine benchmark otherwise
	ultrakv bench

bench-gpu:
	ultrakv bench gpu

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
