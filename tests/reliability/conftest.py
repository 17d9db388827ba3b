"""The reliability tests share the money tests' fixtures (real anvil with the contracts, migrated SQLite)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node" / "payments"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from chainkit import adapter, chain, db, gate, ledger  # noqa: E402,F401
