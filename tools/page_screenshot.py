"""Screenshot the run page of `make demo`'s exploding run: docs/img/run_page.png (the README's picture).

    .venv/bin/python tools/page_screenshot.py                       # runs examples/demo.py, shoots, stops it
    .venv/bin/python tools/page_screenshot.py --page URL            # a page already served

With no --page it starts `examples/demo.py` on a free port and a temporary data directory (it trains a healthy
and an exploding tiny model against its own service), waits for the exploding run's page address the demo ends
with, opens it in headless chromium (Playwright, Debian's `chromium` package), waits for the charts to be drawn
and saves the whole page. Needs the dev extra (playwright) and chromium.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PAGE_PREFIX = "The exploding run's page: "


def shoot(page_url: str, out: Path, width: int) -> None:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("GRADWATCH_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(page_url)
        page.wait_for_function("() => window.__gradwatch && window.__gradwatch.loaded", timeout=30_000)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    if errors:
        raise SystemExit(f"the page logged errors: {errors}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", default=None, help="a run page's URL (default: run the demo and take its own)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "run_page.png")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    if args.page:
        shoot(args.page, args.out, args.width)
        print(f"wrote {args.out}")
        return 0
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="gradwatch-shot-") as tmp:
        env = {**os.environ, "GRADWATCH_DEMO_DIR": tmp, "PYTHONUNBUFFERED": "1"}
        demo = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo.py"), "--port", str(port),
                                 "--steps", str(args.steps)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert demo.stdout is not None
            deadline = time.monotonic() + 600
            for line in demo.stdout:
                print(line, end="")
                if line.startswith(PAGE_PREFIX):
                    shoot(line.removeprefix(PAGE_PREFIX).strip(), args.out, args.width)
                    print(f"wrote {args.out}")
                    return 0
                if time.monotonic() > deadline:
                    break
            raise SystemExit("the demo ended without printing its page")
        finally:
            demo.send_signal(signal.SIGINT)
            demo.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
