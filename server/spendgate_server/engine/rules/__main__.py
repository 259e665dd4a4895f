"""``python -m spendgate_server.engine.rules`` prints the README's rules table."""

from spendgate_server.engine.rules import rules_table_markdown

print(rules_table_markdown())
