"""The settlement tests share the money tests' fixtures (real anvil, migrated SQLite ledger)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "payments"))
from chainkit import adapter, chain, db, gate, ledger  # noqa: E402,F401
