# The two commands a new machine needs (run as root):
#   make demo   install what Baton needs, then run its main job on an embedded default
#   make test   install what the tests need, then run every test tier
# Other targets: lint, bench, bench-smoke, deb (the Debian package: dist/baton_VERSION_ARCH.deb).

PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: demo test test-fast lint bench bench-smoke setup deb

demo:
	scripts/setup.sh runtime
	.venv/bin/baton demo

test:
	scripts/setup.sh test
	scripts/run-tests.sh

test-fast:
	$(PYTEST) -q tests/unit tests/property

lint:
	.venv/bin/ruff check src tests bench
	.venv/bin/mypy

bench:
	scripts/setup.sh bench
	$(PY) -m bench

bench-smoke:
	scripts/setup.sh bench
	$(PY) -m bench --smoke

deb:
	scripts/build-deb.sh
