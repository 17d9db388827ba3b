#!/usr/bin/env bash
# Make sure a headless-capable Chromium is on PATH for tests/node/test_dashboard.py.
# Idempotent: does nothing when `chromium` is already installed; otherwise installs the Debian
# package (needs root, or passwordless sudo).
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "ensure-chromium: chromium is missing and this user cannot install it (not root, no sudo)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium
command -v chromium >/dev/null 2>&1 || { echo "ensure-chromium: install finished but chromium is not on PATH" >&2; exit 1; }
