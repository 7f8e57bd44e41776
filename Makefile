# Two set-up commands: `make up` runs the service, `make test` runs the tests.
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup up test bench clean

setup:
	bash scripts/setup.sh

up: setup
	.venv/bin/loopchat up $(ARGS)

test:
	bash scripts/setup.sh browser
	.venv/bin/python -m pytest -ra $(PYTEST_ARGS)

clean:
	rm -rf .venv .cache
