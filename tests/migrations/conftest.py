"""Migration tests run on the run's backend: SQLite files, or PostgreSQL under scripts/with-postgres.sh."""

from .ledger_databases import empty_db_url, ledger_databases  # noqa: F401  (fixtures)
