# mmproxy — every target installs what it needs on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-venv python3-dev gcc python3-systemd python3-yaml python3-sdnotify \
	iproute2 iptables nftables haproxy procps

.PHONY: all deps venv demo test lint typecheck unit integration clean

all: test

# Debian packages first (the daemon runs on Debian's python3 with Debian's libraries),
# then a virtualenv that sees them and adds what Debian lacks (pytricia) and the dev tools.
deps:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "installing Debian packages: $(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

venv: deps $(VENV)/.installed

demo: venv
	$(PY) -m mmproxy.demo etc/mmproxy/example.yaml

lint: venv
	$(VENV)/bin/ruff check mmproxy tests
	$(VENV)/bin/ruff format --check mmproxy tests

typecheck: venv
	$(VENV)/bin/mypy mmproxy

unit: venv
	$(VENV)/bin/pytest -q -m "not integration and not system"

integration: venv
	$(VENV)/bin/pytest -q -m integration

test: lint typecheck
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
