# mmproxy — every target installs what it needs on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-venv python3-dev gcc python3-systemd python3-yaml python3-sdnotify \
	iproute2 iptables nftables haproxy procps dnsmasq-base nginx libnginx-mod-stream curl \
	bind9-dnsutils libsystemd-dev pkg-config python3-prometheus-client

PREFIX ?= /usr
DESTDIR ?=
LIBDIR := $(PREFIX)/lib/mmproxy
# debian/rules gives the release's own (Debian 12: /lib/systemd/...).
UNITDIR ?= $(PREFIX)/lib/systemd/system
GENERATORDIR ?= $(PREFIX)/lib/systemd/system-generators
PYTRICIA := pytricia==1.3.0
# debian/rules installs with Debian's own pip and no virtualenv (INSTALL_NEEDS empty).
PIP := $(VENV)/bin/pip
INSTALL_NEEDS := venv

# The relay's C part (mmproxy/_splice.c), built against Debian's python3 by setup.py's
# ext_modules, the one definition pip and debian/rules use too. CFLAGS and LDFLAGS come
# from the environment when set (debian/rules exports dpkg's hardening flags).
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
SPLICE_EXT := mmproxy/_splice$(EXT_SUFFIX)
CFLAGS ?= -O2 -g

.PHONY: all deps venv ext sanitize demo test lint typecheck unit integration system install deb deb-deps lintian fuzz soak clean

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

venv: deps $(VENV)/.installed ext

ext: $(SPLICE_EXT)

$(SPLICE_EXT): mmproxy/_splice.c setup.py
	CFLAGS="$(CFLAGS)" $(PYTHON) setup.py -q build_ext --inplace --force --build-temp build/ext
	@test -f $@ || { echo "mmproxy/_splice.c did not build (see the compiler's errors above)" >&2; exit 1; }

demo: venv
	$(PY) -m mmproxy.demo etc/mmproxy/example.yaml

lint: venv
	$(VENV)/bin/ruff check mmproxy tests bench
	$(VENV)/bin/ruff format --check mmproxy tests bench
	$(VENV)/bin/lint-imports  # the import rules: pyproject.toml, [tool.importlinter]

typecheck: venv
	$(VENV)/bin/mypy mmproxy tests bench

unit: venv
	$(VENV)/bin/pytest -q -m "not integration and not system"

integration: venv
	$(VENV)/bin/pytest -q -m integration

system: venv
	$(VENV)/bin/pytest -q -m system

# The installed layout (the Debian package is built from it): the program and what
# Debian lacks (pytricia) in a private directory, run by Debian's python3.
install: $(INSTALL_NEEDS) $(SPLICE_EXT)
	install -d $(DESTDIR)$(LIBDIR)/mmproxy $(DESTDIR)$(PREFIX)/bin
	install -m 644 mmproxy/*.py $(DESTDIR)$(LIBDIR)/mmproxy/
	install -m 644 $(SPLICE_EXT) $(DESTDIR)$(LIBDIR)/mmproxy/
	$(PIP) install -q --disable-pip-version-check --no-deps --no-compile \
		--target $(DESTDIR)$(LIBDIR) $(PYTRICIA)
	rm -rf $(DESTDIR)$(LIBDIR)/bin
	# -I -S: no user site, no PYTHON* variables, no site module (a few ms of every start,
	# issue 15): the one directory site would add that mmproxy needs is Debian's own. The
	# cyclic garbage collector waits until the start-up's imports are done.
	printf '%s\n' '#!/usr/bin/python3 -IS' 'import gc' 'import sys' \
		'gc.disable()  # during the imports (a tenth of their time); mmproxy.cli enables it' \
		'sys.path.insert(0, "$(LIBDIR)")  # mmproxy and what Debian lacks (pytricia)' \
		'sys.path.append("/usr/lib/python3/dist-packages")  # python3-yaml, python3-systemd' \
		'from mmproxy.cli import main  # noqa: E402' 'sys.exit(main())' \
		> $(DESTDIR)$(PREFIX)/bin/mmproxy
	chmod 755 $(DESTDIR)$(PREFIX)/bin/mmproxy
	install -D -m 644 units/mmproxy@.socket $(DESTDIR)$(UNITDIR)/mmproxy@.socket
	install -D -m 644 units/mmproxy@.service $(DESTDIR)$(UNITDIR)/mmproxy@.service
	install -D -m 755 units/mmproxy-generator $(DESTDIR)$(GENERATORDIR)/mmproxy-generator
	install -D -m 644 etc/mmproxy/example.yaml $(DESTDIR)/etc/mmproxy/example.yaml
	install -D -m 644 etc/mmproxy/README $(DESTDIR)/etc/mmproxy/README
	install -D -m 644 docs/mmproxy.8 $(DESTDIR)$(PREFIX)/share/man/man8/mmproxy.8
	install -D -m 644 docs/mmproxy.yaml.5 $(DESTDIR)$(PREFIX)/share/man/man5/mmproxy.yaml.5

# The Debian packages (debian/), built on the release they are for (Debian 12 or 13):
# the source package (dist/mmproxy_<version>.dsc, its .orig.tar.gz, made here from the
# tree without debian/, and .debian.tar.xz, which carries pytricia's pinned source) and
# dist/mmproxy_<version>_<arch>.deb. `deb-deps` installs the build dependencies with apt
# (network); the build itself needs none: run it offline as Debian's build daemons do.
# It builds from a copy of the tree in DEB_BUILD, so that dpkg-buildpackage's by-products
# stay out of the checkout.
DEB_DIST := dist
DEB_BUILD := build/deb
DEB_UPSTREAM := Makefile README.md pyproject.toml setup.py mmproxy units docs etc
DEB_VERSION = $(shell dpkg-parsechangelog -S Version)
DEB_UPSTREAM_VERSION = $(shell dpkg-parsechangelog -S Version | sed 's/^[0-9]*://; s/-[^-]*$$//')
DEB_EPOCH = $(shell dpkg-parsechangelog -S Timestamp)
DEB_SRC = mmproxy-$(DEB_UPSTREAM_VERSION)
deb-deps:
	@if ! command -v dpkg-checkbuilddeps >/dev/null || ! dpkg-checkbuilddeps >/dev/null 2>&1; then \
		echo "installing the build dependencies in debian/control"; \
		DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq ./ >/dev/null 2>&1 || { apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq ./ >/dev/null; }; \
	fi

deb: deb-deps
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/$(DEB_SRC) $(DEB_DIST)
	cp -r $(DEB_UPSTREAM) $(DEB_BUILD)/$(DEB_SRC)/
	find $(DEB_BUILD)/$(DEB_SRC) \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
	# The upstream tarball, the same bytes for the same tree (names sorted, times and
	# owners fixed, gzip without a time stamp).
	tar -C $(DEB_BUILD) --sort=name --mtime=@$(DEB_EPOCH) --owner=0 --group=0 --numeric-owner \
		-cf - $(DEB_SRC) | gzip -9n > $(DEB_BUILD)/mmproxy_$(DEB_UPSTREAM_VERSION).orig.tar.gz
	cp -r debian $(DEB_BUILD)/$(DEB_SRC)/
	cd $(DEB_BUILD)/$(DEB_SRC) && dpkg-buildpackage -us -uc >../build.log 2>&1 \
		|| { tail -n 40 ../build.log; exit 1; }
	rm -f $(DEB_DIST)/mmproxy_* $(DEB_DIST)/mmproxy-dbgsym_*
	cd $(DEB_BUILD) && cp mmproxy_*.deb mmproxy-dbgsym_*.*deb mmproxy_*.dsc mmproxy_*.orig.tar.gz mmproxy_*.debian.tar.* \
		mmproxy_*.changes mmproxy_*.buildinfo $(abspath $(DEB_DIST))/
	@ls -l $(DEB_DIST)/mmproxy_* $(DEB_DIST)/mmproxy-dbgsym_*

# Lintian of this release on what `make deb` built (source and binary): no error, no
# warning (debian/*lintian-overrides say why for the few deliberate ones).
lintian: deb
	@command -v lintian >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends lintian >/dev/null
	lintian --fail-on error,warning --info $(DEB_DIST)/mmproxy_*.changes

# Coverage-guided fuzzing (atheris) of the codecs (PROXY, SPP), the config loader, the C
# header pre-parser (against the codec) and the C part's reading of UDP datagrams,
# 1,000,000 runs each; new interesting inputs are added to tests/fuzz/corpus/. `make test`
# runs a short version (tests/test_fuzz.py).
FUZZ_RUNS ?= 1000000
fuzz: venv
	$(PY) tests/fuzz/fuzz_proxy_protocol.py -runs=$(FUZZ_RUNS) -max_len=1024 -print_final_stats=1 \
		tests/fuzz/corpus/proxy_protocol
	$(PY) tests/fuzz/fuzz_config.py -runs=$(FUZZ_RUNS) -max_len=1024 -print_final_stats=1 \
		tests/fuzz/corpus/config
	$(PY) tests/fuzz/fuzz_spp.py -runs=$(FUZZ_RUNS) -max_len=1024 -print_final_stats=1 \
		tests/fuzz/corpus/spp
	$(PY) tests/fuzz/fuzz_header_c.py -runs=$(FUZZ_RUNS) -max_len=1024 -print_final_stats=1 \
		tests/fuzz/corpus/proxy_protocol
	$(PY) tests/fuzz/fuzz_udp_engine.py -runs=$(FUZZ_RUNS) -max_len=1024 -print_final_stats=1 \
		tests/fuzz/corpus/udp_engine

# Soak (tests/integration/test_soak.py): 100,000 connections with random sizes and close
# orders through one mmproxy, every byte checked; `make test` runs 3,000 of them.
SOAK_CONNECTIONS ?= 100000
soak: venv
	SOAK_CONNECTIONS=$(SOAK_CONNECTIONS) $(VENV)/bin/pytest -q -s tests/integration/test_soak.py

# The C part under AddressSanitizer and UBSan: the tests that drive it (relay, accept,
# connect, faults, workers, EMFILE); any report fails the run. replace_str=0: iproute2's
# `ip` (run by the self-checks) trips ASan's strncpy check. Not the soak: its RSS bound
# cannot hold with ASan's quarantine (256 MiB of freed memory kept).
SANITIZE_TESTS := tests/test_relay.py tests/test_splice.py tests/test_splice_header.py tests/test_splice_handshake.py tests/integration/test_forwarder.py \
	tests/integration/test_faults.py tests/integration/test_supervisor.py \
	tests/integration/test_fd_exhaustion.py tests/test_udp.py tests/test_udp_engine.py \
	tests/integration/test_udp.py
sanitize: venv
	rm -f $(SPLICE_EXT) /tmp/mmproxy-asan.* /tmp/mmproxy-ubsan.*
	$(MAKE) ext CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer"
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:replace_str=0:intercept_strlen=0:intercept_strchr=0:intercept_strndup=0:log_path=/tmp/mmproxy-asan \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=/tmp/mmproxy-ubsan \
		$(VENV)/bin/pytest -q $(SANITIZE_TESTS); status=$$?; \
	rm -f $(SPLICE_EXT); $(MAKE) ext >/dev/null; \
	if ls /tmp/mmproxy-asan.* /tmp/mmproxy-ubsan.* >/dev/null 2>&1; then \
		cat /tmp/mmproxy-asan.* /tmp/mmproxy-ubsan.* 2>/dev/null; exit 1; fi; \
	exit $$status

test: lint typecheck
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache mmproxy/*.so

# The benchmark (bench/, docs/performance.md): mmproxy beside go-mmproxy and HAProxy in
# network namespaces; installs its own tools. bench-quick: reduced sizes, ~5 minutes.
.PHONY: bench bench-quick
bench: venv
	bash bench/setup.sh
	$(PY) -m bench --docs docs/performance.md

bench-quick: venv
	bash bench/setup.sh
	$(PY) -m bench --quick
