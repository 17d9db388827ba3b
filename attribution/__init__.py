"""The ledger: usage and influence logs, Proof of Attribution, receipts, settlement batches, rewards."""
