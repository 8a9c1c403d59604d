"""What an operator sees: status, stats, metrics, logs, the credential check, quarantine."""
