"""The output protocol every job shares: layout, ledger, atomic commits, run summary (no Ray)."""
