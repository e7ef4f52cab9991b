# The conventional entry points; README.md shows the two a fresh machine needs:
#   make run    set up, train a model if there is none, then serve it on :50051
#   make test   set up, lint, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= models/model.onnx
# MNIST: digit-train looks at --data-dir, $MNIST_DATA_DIR, ../shared/mnist, then downloads.
PYTEST_ARGS ?=
# Local runs serve plaintext on purpose; see docs/operations.md for TLS and tokens.
# Ports taken? `make run PORT=6000 HTTP_PORT=8081 METRICS_PORT=8003` (metrics: 8002 or
# $DIGITS_METRICS_PORT unless METRICS_PORT is given).
PORT ?= 50051
HTTP_PORT ?= 8080
METRICS_PORT ?=
SERVE_ARGS ?= --plaintext --port $(PORT) --http-port $(HTTP_PORT) \
	$(if $(METRICS_PORT),--metrics-port $(METRICS_PORT))

.PHONY: run serve test setup train train-best lint protos bench docker-test soak browser-test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[all]"
	touch $@

setup: $(BIN)/.installed

$(MODEL): | $(BIN)/.installed
	$(BIN)/digit-train --output $(MODEL)

run: $(MODEL)
	$(BIN)/digit-server --model $(MODEL) $(SERVE_ARGS)

serve: setup
	$(BIN)/digit-server --model $(MODEL) $(SERVE_ARGS)

browser-test: setup
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/pip install --quiet -e ".[all,browser]"
	$(BIN)/python -m pytest tests/test_browser.py

soak: setup
	DIGITS_SOAK=1 $(BIN)/python -m pytest -s tests/test_soak.py

docker-test: setup
	scripts/docker_smoke.sh

# ~20 min: this server vs its onnxruntime ceiling, a bare grpc.aio floor, KServe, MLServer and
# Triton (each installed once into ~/.cache/digit-recognizer/peer-*). docs/performance.md.
bench: $(MODEL)
	$(BIN)/python -m bench --model $(MODEL) --out reports/bench $(BENCH_ARGS)

train: setup
	$(BIN)/digit-train --output $(MODEL) $(TRAIN_ARGS)

train-best: setup
	$(BIN)/digit-train --preset best --output $(MODEL) --report reports/ $(TRAIN_ARGS)

protos: setup
	$(BIN)/python -m digit_recognizer.protos.generate

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy trainer server client

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
