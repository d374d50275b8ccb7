"""Take a screenshot of the real page, after its list has filled, for the README.

    python scripts/screenshot.py [PATH]    (default: docs/screenshot.png)

It starts the server on a free port, opens the page in the distribution's
Chromium (``apt-get install chromium``) with Playwright, waits for the list to
be full, saves a PNG and stops the server. The tests drive the
browser with the same ``launch_chromium()``.
"""
import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from playwright.sync_api import sync_playwright

PROJECT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# No sandbox: containers and CI runners often run as root, where Chromium's sandbox cannot start.
# The rest keeps the browser from talking to anything but the page under test.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 800, "height": 560}
# The tenth item (the server's default HISTORY_SIZE): the list is full. A selector
# rather than a JavaScript condition, which the page's Content-Security-Policy forbids.
LIST_IS_FULL = "#numbers li:nth-child(10)"


def launch_chromium(playwright):
    """Start the system's Chromium; Playwright never downloads a browser of its own here."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def take_screenshot(url, path):
    """Open ``url``, wait until the list is full, and save a PNG of the page to ``path``."""
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
            page.goto(url)
            page.wait_for_selector(LIST_IS_FULL, timeout=30_000)
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()


def start_server(port):
    """Start ``python application.py`` on ``port`` and wait until it answers."""
    server = subprocess.Popen(
        [sys.executable, "application.py", "--port", str(port)],
        cwd=PROJECT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return server
        except requests.ConnectionError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            sys.exit(f"The server on port {port} did not start")
        time.sleep(0.1)


def free_port():
    """Return a TCP port that is free on localhost right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    """Take the screenshot from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=PROJECT / "docs" / "screenshot.png")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing: install the distribution's chromium package")

    port = free_port()
    server = start_server(port)
    try:
        take_screenshot(f"http://127.0.0.1:{port}/", args.path)
    finally:
        server.terminate()
        server.wait()
    print(f"Saved {args.path}")


if __name__ == "__main__":
    main()
