#!/usr/bin/env bash
# The benchmark's own tools, from Debian's archive (as root): the peers it measures
# mmproxy against, the chart library, and the compiler for the load generator.
set -euo pipefail
PACKAGES=(haproxy go-mmproxy python3-matplotlib gcc libc6-dev iproute2 util-linux procps)
if ! dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1; then
	echo "installing Debian packages: ${PACKAGES[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		"${PACKAGES[@]}" >/dev/null
fi
