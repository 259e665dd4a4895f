"""spendgate server: the Decide service, its rule engine and stores."""
