# Everything installs itself into .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_AUTH_MODE := disabled

.PHONY: venv demo test test-fast bench gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps retinaface-pytorch==0.0.8
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m ray_jobs.demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

# The wheels benchmarks/gpu_check.sh installs on a GPU machine without them (carry .whl there).
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps -d .whl open-clip-torch==3.3.0 timm==1.0.31 retinaface-pytorch==0.0.8 \
		ftfy==6.3.1 wcwidth==0.9.4

clean:
	rm -rf $(VENV) demo_out .pytest_cache
