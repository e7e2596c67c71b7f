# ModelForge developer commands. `make run` and `make test` need only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := node_modules/.bin/buf
PROTOS := $(shell find protos -name '*.proto' | sort)
GEN_OUT := clients/python
# Extra arguments for run (`modelforge up`), test (pytest) and bench: make run ARGS="--registry-port 6051".
ARGS ?=

.PHONY: run test test-fast gen lint fmt bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
	@# The editable install finds the packages through an import hook, which type checkers and editors do not run;
	@# plain path entries to the two package roots they do read.
	@$(BIN)/python -c 'import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_path("purelib"), \
		"modelforge-sources.pth").write_text("".join(f"{pathlib.Path(d).resolve()}\n" for d in sys.argv[1:]))' \
		clients/python services
	@touch $(STAMP)

## Start the whole suite on embedded PostgreSQL and Redis (or MODELFORGE_DATABASE_URL / MODELFORGE_REDIS_URL).
run: $(STAMP)
	$(BIN)/modelforge up $(ARGS)

## Run the whole test suite.
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

## Unit tests only: no servers, no sockets.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(ARGS)

## Regenerate the Python code and .pyi stubs from protos/.
gen: $(STAMP)
	@rm -rf $(wildcard $(GEN_OUT)/modelforge/*/v*)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=$(GEN_OUT) --grpc_python_out=$(GEN_OUT) \
		--mypy_out=quiet:$(GEN_OUT) --mypy_grpc_out=quiet:$(GEN_OUT) $(PROTOS)
	@for f in $(PROTOS:protos/%=%); do d=$$(dirname $$f); while [ "$$d" != modelforge ]; do \
		touch $(GEN_OUT)/$$d/__init__.py; d=$$(dirname $$d); done; done

$(BUF): package.json
	npm install --no-audit --no-fund --silent
	@touch $(BUF)

## ruff, mypy (strict), buf lint and both formatters in check mode.
lint: $(STAMP) $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint
	$(BUF) format -d --exit-code

fmt: $(STAMP) $(BUF)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BUF) format -w

## Benchmarks: start the suite, measure, write docs/PERFORMANCE.md.
bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
