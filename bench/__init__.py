"""``make bench``: spendgate's Decide and Settle measured against a naive floor (see run.py)."""
