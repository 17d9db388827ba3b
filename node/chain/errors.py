"""Errors of the chain client.

    ChainError                 anything the chain side raises on purpose
    ├── ArtifactError          a contract artifact is missing, unreadable or stale
    ├── AnvilError             a local anvil could not be found, started or stopped
    ├── RpcUnavailable         the RPC endpoint does not answer
    ├── DeploymentError        deploying failed, or a deployment file is missing, invalid or not on this chain
    └── ContractRevert         a call or transaction reverted; carries the decoded custom error
"""

from __future__ import annotations

from typing import Any


class ChainError(Exception):
    """Base class of every error the chain client raises on purpose."""


class ArtifactError(ChainError):
    """A contract artifact is missing, unreadable or out of date."""


class AnvilError(ChainError):
    """A local anvil could not be found, started or stopped."""


class RpcUnavailable(ChainError):
    """The RPC endpoint does not answer."""


class DeploymentError(ChainError):
    """Deploying failed, or a deployment file is missing, invalid or does not match the chain."""


class ContractRevert(ChainError):
    """A contract call or transaction reverted.

    `error` is the custom error's name (e.g. "VoucherExceeded"), "Error" for `revert("...")`, "Panic"
    for a panic, or None when the revert carried no data; `args` maps the error's parameter names to
    the decoded values; `data` is the raw revert data.
    """

    def __init__(self, function: str, error: str | None, args: dict[str, Any] | None = None,
                 data: bytes = b"", message: str | None = None) -> None:
        self.function = function
        self.error = error
        self.args_ = dict(args or {})
        self.data = data
        if message is None:
            if error is None:
                message = f"{function} reverted without a reason"
            else:
                shown = ", ".join(f"{k}={_show(v)}" for k, v in self.args_.items())
                message = f"{function} reverted: {error}({shown})"
        super().__init__(message)

    @property
    def error_args(self) -> dict[str, Any]:
        return self.args_


def _show(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    return str(value)
