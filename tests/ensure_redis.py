"""Make sure redis-server is installed before the tests start (``make test`` runs this first).

Installs Debian's package when running as root with apt-get; otherwise says, in one
line, how to install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def main() -> int:
    """Return 0 when redis-server is (now) on PATH."""
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return 0
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("redis-server not found: installing Debian's redis-server package", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "redis-server"],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        if shutil.which("redis-server"):
            return 0
    print(
        "redis-server is needed by the tests: install it (Debian/Ubuntu: 'sudo apt-get install "
        "redis-server', macOS: 'brew install redis') and run 'make test' again",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
