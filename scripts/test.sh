#!/usr/bin/env bash
# Runs every test. Sets up what the tests need on a Debian/Ubuntu machine
# (packages, the test virtualenv, npm tools), brings the local stack up with
# ./scripts/up.sh (safe when it is already up), then runs ruff, mypy and pytest.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k billing
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"
cd "$REPO_DIR"

[[ "$(id -u)" == 0 ]] || die "run as root (tests manage root's PM2 and the databases): sudo $0"

apt_install curl
apt_install iproute2
apt_install shellcheck
apt_install vagrant
apt_install vagrant-libvirt
apt_install ruby  # the Vagrantfile's .env reader, tests/unit/test_env_grammar.py
apt_install chromium  # tests/stack/test_docs_browser.py: /docs in a real browser
apt_install chromium-driver
# The three Debian hosts of tests/hosts/test_hosts.py (scripts/hosts.sh).
apt_install debootstrap
apt_install systemd-container
apt_install nftables
ensure_node_pm2
ensure_venv dev
log "npm: installing newman and swagger-ui-dist (package-lock.json)"
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null

"$REPO_DIR/scripts/up.sh" >/dev/null
start_postgres
start_rabbitmq

log "ruff"
venv/dev/bin/ruff check .
venv/dev/bin/ruff format --check .

log "mypy"
venv/dev/bin/mypy

log "pytest"
exec venv/dev/bin/python -m pytest tests -ra "$@"
