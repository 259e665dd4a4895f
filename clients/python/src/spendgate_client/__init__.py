"""spendgate client."""
