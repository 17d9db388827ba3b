"""Errors of the ledger. The CLI and the API turn any `LedgerError` into a one-line message.

    LedgerError
    ├── InvalidInput          bad data handed to the ledger (nothing was written)
    ├── NotFound              a payer, adapter, request, receipt or batch that does not exist
    ├── ConflictError         the same id recorded twice with different content
    ├── VoucherError          a payer voucher is missing, stale, or does not cover a debit
    ├── SignatureError        a receipt or voucher signature does not verify
    ├── BatchStateError       a settlement batch transition the state machine forbids
    ├── DatabaseError         the database cannot be opened or migrated
    └── IndexFormatError      an attribution index file is unreadable or incompatible
"""


class LedgerError(Exception):
    """Base class of every error the ledger raises on purpose."""


class InvalidInput(LedgerError, ValueError):
    """Bad data handed to the ledger; nothing was written."""


class NotFound(LedgerError, LookupError):
    """A payer, adapter, request, receipt or batch that does not exist."""


class ConflictError(LedgerError):
    """The same id was recorded before with different content."""


class VoucherError(LedgerError):
    """A payer voucher is missing, stale, or does not cover a debit."""


class SignatureError(LedgerError):
    """A receipt or voucher signature does not verify."""


class BatchStateError(LedgerError):
    """A settlement batch transition the state machine forbids."""


class DatabaseError(LedgerError):
    """The database cannot be opened or migrated."""


class IndexFormatError(LedgerError):
    """An attribution index file is unreadable or incompatible."""
