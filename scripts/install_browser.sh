#!/usr/bin/env bash
# Make sure a Chromium is installed for the page test (tests/test_page.py), the Debian way.
#
#   scripts/install_browser.sh        # idempotent; the Makefile's test setup calls it
#
# Installs Debian's `chromium` package when no Chromium is on the PATH, if we are root and have
# apt-get. Otherwise it says why it did nothing and exits 0: the page test then skips with a loud
# reason (or fails, with TINYSTORIES_REQUIRE_BROWSER=1). Playwright drives this browser through
# its executable path; `playwright install` (which downloads a browser build) is never needed.
set -euo pipefail

for candidate in "${TINYSTORIES_CHROMIUM:-}" chromium chromium-browser; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then
        echo "install_browser: Chromium already installed: $(command -v "$candidate")"
        exit 0
    fi
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: Chromium missing and not root; install it with: sudo apt-get install chromium (page test will be skipped)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: Chromium missing and no apt-get here; install Chromium yourself and set TINYSTORIES_CHROMIUM (page test will be skipped)"
    exit 0
fi

echo "install_browser: installing Debian's chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq chromium >/dev/null; then
    echo "install_browser: installed $(command -v chromium)"
else
    echo "install_browser: apt-get could not install chromium (no package mirror reachable?); page test will be skipped"
fi
exit 0
