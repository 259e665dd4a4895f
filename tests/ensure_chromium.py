"""Make sure Debian's Chromium is installed for the console's browser tests.

``make test`` (or CI) runs this first; the browser test module also calls ``ensure()`` when
it is collected, so a plain ``pytest`` run as root installs it too. The tests drive
``/usr/bin/chromium`` with Playwright; Playwright's own browser download is never used.
Installs Debian's ``chromium`` package, and a font with wide coverage so that screenshots
show text rather than boxes, when running as root with apt-get. Where that is not possible
the browser tests skip, and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
PACKAGES = ("chromium", "fonts-liberation")
INSTALL_TIMEOUT_SECONDS = 900


def chromium_path() -> Path | None:
    """The Chromium binary the browser tests use, if it is installed."""
    if CHROMIUM.exists():
        return CHROMIUM
    found = shutil.which("chromium")
    return Path(found) if found else None


def ensure() -> tuple[Path | None, str]:
    """Chromium's path, installing Debian's package first if it is missing and we may.

    Returns:
        The path, or None and the reason it cannot be had here.
    """
    if (path := chromium_path()) is not None:
        return path, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, (
            "chromium is not installed and this is not root with apt-get: install it "
            "(Debian/Ubuntu: 'sudo apt-get install chromium') to run the console's browser tests"
        )
    print("chromium not found: installing Debian's chromium package", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
            subprocess.run(
                argv,
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=INSTALL_TIMEOUT_SECONDS,
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        stderr = exc.stderr.decode(errors="replace").strip() if isinstance(exc.stderr, bytes) else ""
        return None, f"'{' '.join(exc.cmd)}' failed, so chromium cannot be installed here: {stderr[-300:]}"
    if (path := chromium_path()) is not None:
        return path, ""
    return None, "apt-get installed the chromium package but no chromium binary is on PATH"


def main() -> int:
    """Exit 0 when Chromium is (now) installed; otherwise print why and exit 0 too (the tests skip)."""
    path, reason = ensure()
    if path is None:
        print(f"the console's browser tests will skip: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
