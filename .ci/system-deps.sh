#!/usr/bin/env bash
# Installs the Debian packages the test suite can use (PostgreSQL 15, Chromium). Best effort: without root or
# apt-get it says so and returns 0, and the tests that need these skip with a notice.
set -u
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: not root or no apt-get; missing ${need[*]} (their tests will be skipped)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${need[@]}" fonts-dejavu-core >/dev/null 2>&1 \
    || echo "system-deps: apt-get install ${need[*]} failed (their tests will be skipped)"
exit 0
