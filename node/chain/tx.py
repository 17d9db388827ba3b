"""Sending transactions and making calls with readable errors.

Transactions are signed locally with an eth-account key (works against any RPC, anvil included) and
waited for; a revert, in gas estimation or on chain, becomes ContractRevert carrying the decoded custom
error (name and arguments) from the artifacts' ABIs.
"""

from __future__ import annotations

from typing import Any

from eth_abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception

from node.chain.artifacts import error_table
from node.chain.errors import ChainError, ContractRevert, RpcUnavailable

GAS_MARGIN = 1.25


def connect(rpc_url: str, timeout: float = 30.0) -> Web3:
    """A Web3 on `rpc_url`; RpcUnavailable when it does not answer."""
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
    try:
        w3.eth.chain_id  # noqa: B018 - a round trip proves the endpoint answers
    except (OSError, Web3Exception, ValueError) as exc:
        raise RpcUnavailable(f"no JSON-RPC answer from {rpc_url}: {exc}") from None
    return w3


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return b""
    return b""


def decode_revert(data: bytes) -> tuple[str | None, dict[str, Any]]:
    """(error name, {arg name: value}) of revert data; (None, {}) when empty, ("0x<selector>", {}) when
    the selector is unknown."""
    if len(data) < 4:
        return None, {}
    spec = error_table().get(data[:4])
    if spec is None:
        return "0x" + data[:4].hex(), {}
    try:
        values = abi_decode(spec.types, data[4:])
    except Exception:  # noqa: BLE001 - malformed payload: keep the name
        return spec.name, {}
    values = [Web3.to_checksum_address(v) if t == "address" else v for t, v in zip(spec.types, values, strict=True)]
    return spec.name, dict(zip(spec.names, values, strict=True))


def revert_from(exc: ContractLogicError, label: str) -> ContractRevert:
    data = _as_bytes(getattr(exc, "data", None))
    name, args = decode_revert(data)
    if name is None and getattr(exc, "message", None) and exc.message not in ("execution reverted",):
        return ContractRevert(label, None, data=data, message=f"{label} reverted: {exc.message}")
    return ContractRevert(label, name, args, data)


def call(fn, label: str, block: Any = "latest") -> Any:
    """`fn.call()` with reverts as ContractRevert."""
    try:
        return fn.call(block_identifier=block)
    except ContractLogicError as exc:
        raise revert_from(exc, label) from None
    except (OSError, Web3Exception) as exc:
        raise ChainError(f"{label} failed: {exc}") from None


class Transactor:
    """Signs and sends transactions from one local account, waiting for each receipt."""

    def __init__(self, w3: Web3, account: LocalAccount, receipt_timeout: float = 120.0) -> None:
        self.w3 = w3
        self.account = account
        self.receipt_timeout = receipt_timeout
        self.chain_id = w3.eth.chain_id

    @property
    def address(self) -> str:
        return self.account.address

    def send(self, fn, label: str, *, value: int = 0, gas: int | None = None):
        """Builds, signs and sends `fn` (a bound contract function or constructor); returns the receipt."""
        params: dict[str, Any] = {
            "from": self.account.address,
            "nonce": self.w3.eth.get_transaction_count(self.account.address, "pending"),
            "chainId": self.chain_id,
            "value": value,
        }
        try:
            if gas is None:
                gas = int(fn.estimate_gas(params) * GAS_MARGIN)
            tx = fn.build_transaction({**params, "gas": gas})
        except ContractLogicError as exc:
            raise revert_from(exc, label) from None
        except (OSError, Web3Exception) as exc:
            raise ChainError(f"{label}: cannot build the transaction: {exc}") from None
        signed = self.account.sign_transaction(tx)
        try:
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.receipt_timeout)
        except TimeExhausted:
            raise ChainError(f"{label}: no receipt within {self.receipt_timeout:.0f}s") from None
        except ContractLogicError as exc:
            raise revert_from(exc, label) from None
        except (OSError, Web3Exception) as exc:
            raise ChainError(f"{label}: sending failed: {exc}") from None
        if receipt["status"] != 1:
            raise self._replay_revert(tx, receipt, label)
        return receipt

    def _replay_revert(self, tx: dict, receipt, label: str) -> ContractRevert:
        """Re-runs a mined-but-failed transaction as a call at its block to recover the revert reason."""
        call_tx = {k: tx[k] for k in ("from", "to", "data", "value", "gas") if k in tx}
        try:
            self.w3.eth.call(call_tx, block_identifier=receipt["blockNumber"] - 1)
        except ContractLogicError as exc:
            return revert_from(exc, label)
        except (OSError, Web3Exception):
            pass
        return ContractRevert(label, None, message=f"{label} failed on chain (tx {receipt['transactionHash'].hex()})")
