"""Make sure Debian's Chromium is installed before the browser tests run (``make test`` runs this first).

The console's end-to-end tests drive ``/usr/bin/chromium`` with Playwright; Playwright's
own browser download is never used. Installs Debian's ``chromium`` package (and a font
with wide coverage, so screenshots show text rather than boxes) when running as root
with apt-get; otherwise says, in one line, how to install it. Exits 0 either way when
Chromium cannot be had: the browser tests then skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
PACKAGES = ("chromium", "fonts-liberation")


def chromium_path() -> Path | None:
    """The Chromium binary the browser tests use, if it is installed."""
    if CHROMIUM.exists():
        return CHROMIUM
    found = shutil.which("chromium")
    return Path(found) if found else None


def main() -> int:
    """Install Chromium when it is missing and we can; 1 only if apt-get itself fails."""
    if chromium_path() is not None:
        return 0
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("chromium not found: installing Debian's chromium package", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *PACKAGES],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        if chromium_path() is not None:
            return 0
        return 1
    print(
        "chromium is not installed, so the console's browser tests will skip: install it "
        "(Debian/Ubuntu: 'sudo apt-get install chromium') and run 'make test' again",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
