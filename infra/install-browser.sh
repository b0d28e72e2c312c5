#!/usr/bin/env bash
# The headless browser of the UI tests (tests/flows/test_ui.py): Debian's chromium and its chromedriver.
# Installed where apt-get can be used (root, or sudo without a password); elsewhere this says why in one
# line and succeeds, so the install goes on and the UI tests skip with that reason.
set -u
packages=(chromium chromium-driver)
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "browser: no apt-get on this machine; install chromium and chromedriver yourself to run the UI tests"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "browser: installing ${packages[*]} needs root or sudo without a password; the UI tests will be skipped"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() { "${as_root[@]}" apt-get install -y -q "${packages[@]}" >/dev/null; }
# The package lists of a fresh machine may be missing or stale: update them only when the install needs it.
if install || { "${as_root[@]}" apt-get update -q >/dev/null && install; }; then
    echo "browser: $(chromium --version 2>/dev/null) with $(chromedriver --version | cut -d' ' -f1-2)"
else
    echo "browser: apt-get install ${packages[*]} failed; the UI tests will be skipped"
fi
