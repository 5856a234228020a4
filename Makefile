# relais — every set-up step lives here, so a fresh machine needs only `make run` or `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard proto/relais/v1/*.proto)

.PHONY: run test lint typecheck proto bench loadtest clean fmt

# The virtual environment is rebuilt whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,loadtest]'
	@touch $(STAMP)

## make run: the engine, the scheduler and the gateway with embedded defaults (private Redis, local sinks).
run: $(STAMP)
	$(BIN)/relais run

## make test: lint, types, then the whole test suite against a private Redis.
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd proto && npx --yes @bufbuild/buf@1 lint

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

## make proto: regenerate the committed Python code and type stubs from proto/relais/v1/*.proto.
proto: $(STAMP)
	$(BIN)/python -m common.protogen proto

bench: $(STAMP)
	$(BIN)/python -m loadtest.bench $(if $(QUICK),--quick,) $(ARGS)

loadtest: $(STAMP)
	$(BIN)/python -m loadtest.run $(if $(QUICK),--quick,) $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
