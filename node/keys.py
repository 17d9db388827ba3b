"""The node key: an Ethereum key kept in an encrypted keystore file (eth-account's scrypt V3 format).

The password comes from OPENLORA_KEY_PASSWORD, else an interactive prompt; it is never stored, and the
key is never logged or printed (only its address is).
"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path

from eth_account import Account

from node.errors import ConfigError

PASSWORD_ENV = "OPENLORA_KEY_PASSWORD"


def password(*, confirm: bool = False) -> str:
    """The keystore password from the environment, else asked for (twice when creating)."""
    pw = os.environ.get(PASSWORD_ENV)
    if pw:
        return pw
    try:
        pw = getpass.getpass("keystore password: ")
        if confirm and getpass.getpass("again: ") != pw:
            raise ConfigError("passwords differ")
    except EOFError:
        raise ConfigError(f"no keystore password: set {PASSWORD_ENV} or run interactively") from None
    if not pw:
        raise ConfigError("the keystore password must not be empty")
    return pw


def create_keystore(path: Path, pw: str, *, private_key: str | None = None) -> str:
    """Write a new (or the given) key encrypted under `pw`; refuses to overwrite. Returns the address."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} exists; refusing to overwrite a key")
    acct = Account.from_key(private_key) if private_key else Account.create()
    doc = Account.encrypt(acct.key, pw)
    path.parent.mkdir(parents=True, exist_ok=True)
    # create with 0600 from the start so the encrypted key is never readable by others, even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    return acct.address


def load_key(path: Path, pw: str | None = None) -> str:
    """The private key (0x-hex) of the keystore at `path`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no node key at {path}; run `openlora init`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"keystore {path} is unreadable: {exc}") from None
    try:
        key = Account.decrypt(doc, pw if pw is not None else password())
    except ValueError:
        raise ConfigError(f"wrong password for keystore {path}") from None
    return "0x" + bytes(key).hex()


def keystore_address(path: Path) -> str:
    try:
        return "0x" + json.loads(Path(path).read_text())["address"].removeprefix("0x")
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"keystore {path} is unreadable: {exc}") from None


__all__ = ["PASSWORD_ENV", "create_keystore", "keystore_address", "load_key", "password"]
