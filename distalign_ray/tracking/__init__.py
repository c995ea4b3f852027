"""MLflow tracking: the store, runs, and the names that are a contract with the UI."""
