"""A real headless browser for the page tests: Playwright driving Debian's `chromium` package (browser downloads
are not reachable here; `make test` installs the package as root). Missing, the tests that need it skip, except
under CI=true, where that fails the run (tests/support/requirements.py)."""

from __future__ import annotations

import os
import shutil

from .requirements import unavailable

__all__ = ["CHROMIUM_ARGS", "require_chromium"]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def require_chromium() -> str:
    """The chromium executable (GRADWATCH_TEST_CHROMIUM, else `chromium` on the PATH), with Playwright importable."""
    path = os.environ.get("GRADWATCH_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        unavailable("chromium", f"not found at {path} (apt-get install chromium; `make test` does as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        unavailable("playwright", f"{exc} (pip install -e '.[dev]')")
    return path
