# mmproxy — every target installs what it needs on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-venv python3-dev gcc python3-systemd python3-yaml python3-sdnotify \
	iproute2 iptables nftables haproxy procps

PREFIX ?= /usr
DESTDIR ?=
LIBDIR := $(PREFIX)/lib/mmproxy
PYTRICIA := pytricia==1.3.0

.PHONY: all deps venv demo test lint typecheck unit integration system install clean

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

system: venv
	$(VENV)/bin/pytest -q -m system

# The installed layout (the Debian package is built from it): the program and what
# Debian lacks (pytricia) in a private directory, run by Debian's python3.
install: venv
	install -d $(DESTDIR)$(LIBDIR)/mmproxy $(DESTDIR)$(PREFIX)/bin
	install -m 644 mmproxy/*.py $(DESTDIR)$(LIBDIR)/mmproxy/
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-compile \
		--target $(DESTDIR)$(LIBDIR) $(PYTRICIA)
	rm -rf $(DESTDIR)$(LIBDIR)/bin
	printf '%s\n' '#!/usr/bin/python3' 'import sys' \
		'sys.path.insert(0, "$(LIBDIR)")  # mmproxy and what Debian lacks (pytricia)' \
		'from mmproxy.cli import main  # noqa: E402' 'sys.exit(main())' \
		> $(DESTDIR)$(PREFIX)/bin/mmproxy
	chmod 755 $(DESTDIR)$(PREFIX)/bin/mmproxy
	install -D -m 644 units/mmproxy@.socket $(DESTDIR)$(PREFIX)/lib/systemd/system/mmproxy@.socket
	install -D -m 644 units/mmproxy@.service $(DESTDIR)$(PREFIX)/lib/systemd/system/mmproxy@.service
	install -D -m 755 units/mmproxy-generator \
		$(DESTDIR)$(PREFIX)/lib/systemd/system-generators/mmproxy-generator
	install -D -m 644 etc/mmproxy/example.yaml $(DESTDIR)/etc/mmproxy/example.yaml
	install -D -m 644 docs/mmproxy.8 $(DESTDIR)$(PREFIX)/share/man/man8/mmproxy.8
	install -D -m 644 docs/mmproxy.yaml.5 $(DESTDIR)$(PREFIX)/share/man/man5/mmproxy.yaml.5

test: lint typecheck
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache

# The benchmark (bench/, docs/performance.md): mmproxy beside go-mmproxy and HAProxy in
# network namespaces; installs its own tools. bench-quick: reduced sizes, ~2 minutes.
.PHONY: bench bench-quick
bench: venv
	bash bench/setup.sh
	$(PY) -m bench --docs docs/performance.md

bench-quick: venv
	bash bench/setup.sh
	$(PY) -m bench --quick
