#!/bin/sh
# Idempotent: install Debian's chromium (headless browser for the report screenshot test).
# Exit 0 when chromium is available afterwards; non-zero (with a reason on stderr) when it cannot be.
set -u
find_chromium() { command -v chromium || command -v chromium-browser || command -v google-chrome; }
if find_chromium >/dev/null 2>&1; then
    find_chromium
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo -n"
    $SUDO true 2>/dev/null || { echo "install_chromium: not root and no passwordless sudo" >&2; exit 2; }
else
    SUDO=""
fi
command -v apt-get >/dev/null 2>&1 || { echo "install_chromium: no apt-get on this system" >&2; exit 2; }
export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing or stale: update first, and once more if the install fails.
$SUDO apt-get update -qq >&2 || echo "install_chromium: apt-get update failed" >&2
if ! $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2; then
    echo "install_chromium: apt-get install chromium failed" >&2
    exit 3
fi
find_chromium || { echo "install_chromium: installed, yet no chromium binary on PATH" >&2; exit 3; }
