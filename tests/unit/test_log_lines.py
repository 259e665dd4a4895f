"""Each log line leaves the process in one write, newline included.

A server and its evaluator child process share one stderr, which Python leaves unbuffered:
a line written in two parts (text, then newline) can be split by the other process's
line, leaving two JSON objects on one line that no log collector can parse.
"""

from __future__ import annotations

import json
import subprocess
import sys

RECORD_WRITES = """
import io, json, sys

class Recorder(io.TextIOBase):
    def __init__(self):
        self.writes = []
    def write(self, text):
        self.writes.append(text)
        return len(text)
    def isatty(self):
        return False

recorder = Recorder()
sys.stderr = recorder
from spendgate_server.logging import configure_logging
import structlog
configure_logging("json", "debug")
log = structlog.get_logger("test")
log.info("first", detail="x" * 300)
log.warning("second", process="evaluator")
log.debug("third")
print(json.dumps(recorder.writes))
"""


def test_each_line_is_one_write_with_its_newline() -> None:
    done = subprocess.run(
        [sys.executable, "-c", RECORD_WRITES], capture_output=True, text=True, check=True, timeout=60
    )
    writes = json.loads(done.stdout)
    assert [json.loads(w)["event"] for w in writes] == ["first", "second", "third"]
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in writes)
