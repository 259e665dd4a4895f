"""``python -m spendgate_server`` is the ``spendgate`` command."""

from spendgate_server.cli import main

main()
