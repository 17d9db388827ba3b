"""`openlora init`: a config file and an encrypted node key.

    openlora init [--data-dir DIR] [--rpc-url URL] [--deployment-file F] [--import-key-env VAR] [--force]

The key is written as an eth-account keystore (scrypt) under the data dir; its password comes from
OPENLORA_KEY_PASSWORD or a prompt. The config file is the one `--config` names, else OPENLORA_CONFIG,
else the user config dir; later commands (`node register`) add to it.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from pathlib import Path

from node import keys
from node.config import default_config_file
from node.errors import ConfigError


def config_path(args) -> Path:
    explicit = getattr(args, "config", None) or os.environ.get("OPENLORA_CONFIG")
    return Path(explicit) if explicit else default_config_file()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def update_config(path: Path, **values) -> None:
    """Merge flat settings into the TOML config file (created if missing), atomically."""
    data = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"cannot update {path}: {exc}") from None
    table = data.get("openlora", data)
    if any(isinstance(v, dict) for k, v in table.items()):
        raise ConfigError(f"{path} has nested tables; edit it by hand")
    table.update({k: v for k, v in values.items() if v is not None})
    text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in sorted(table.items()))
    if "openlora" in data:
        text = "[openlora]\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a config file and an encrypted node key",
                       description="Create a config file and an encrypted node key (eth-account keystore).")
    p.add_argument("--data-dir", type=Path, help="ledger, keys and adapters (default: the user data dir)")
    p.add_argument("--rpc-url", help="EVM JSON-RPC URL (default http://127.0.0.1:8545)")
    p.add_argument("--deployment-file", type=Path, help="contract addresses (default <data dir>/deployment.json)")
    p.add_argument("--import-key-env", metavar="VAR", help="take the private key from this environment variable "
                                                             "instead of generating one")
    p.set_defaults(func=_init, creates_config=True)


def _init(args, settings) -> int:
    path = config_path(args)
    data_dir = (args.data_dir or settings.data_dir).expanduser().resolve()
    keystore = data_dir / "node-key.json"
    imported = None
    if args.import_key_env:
        imported = os.environ.get(args.import_key_env)
        if not imported:
            raise ConfigError(f"environment variable {args.import_key_env} is empty")
    address = keys.create_keystore(keystore, keys.password(confirm=True), private_key=imported)
    update_config(path, data_dir=str(data_dir), keystore_file=str(keystore), rpc_url=args.rpc_url,
                  deployment_file=str(args.deployment_file.expanduser().resolve()) if args.deployment_file else None)
    print(f"node key {address} written to {keystore} (encrypted)")
    print(f"config written to {path}")
    print("next: `openlora node register --endpoint URL` once the contracts are deployed")
    return 0
