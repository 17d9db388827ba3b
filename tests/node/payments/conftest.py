"""Fixtures of the money tests: a real anvil with the contracts deployed and a migrated SQLite ledger."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chainkit import adapter, chain, db, gate, ledger  # noqa: E402,F401
