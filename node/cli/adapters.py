"""`openlora adapters sync|list|publish`: the registry's adapters for this node's base model.

    sync      mirror AdapterRegistry into the ledger; --download also pulls (and verifies) every adapter
    list      registered adapters, their prices and split, and whether they are in the local store
    publish   pack a PEFT folder (deterministic tar.gz), place it where nodes can fetch it (a directory,
              fetched as file:// or through --base-url, an HTTP server on loopback serving that
              directory), and register it on chain with its sha256, prices and revenue split
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eth_account import Account
from web3.logs import DISCARD  # other contracts' logs in the same receipt are not ours

from node.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="registry adapters: sync, list, publish",
                       description="Adapters registered for this node's base model.")
    asub = p.add_subparsers(dest="adapters_command", metavar="ACTION")
    asub.required = True
    s = asub.add_parser("sync", help="mirror the registry into the ledger", description="Mirror AdapterRegistry "
                        "into the ledger; with --download also fetch and verify every adapter.")
    s.add_argument("--download", action="store_true")
    s.set_defaults(func=_sync)
    ls = asub.add_parser("list", help="list registered adapters", description="List registered adapters.")
    ls.set_defaults(func=_list)
    pub = asub.add_parser("publish", help="pack, place and register an adapter",
                          description="Pack a PEFT folder, place the archive, register it on chain.")
    pub.add_argument("folder", type=Path, help="PEFT folder (adapter_config.json, adapter_model.safetensors)")
    pub.add_argument("--name", required=True, help="name clients use as `model`")
    pub.add_argument("--price-in", type=int, required=True, help="base units per 1M input tokens")
    pub.add_argument("--price-out", type=int, required=True, help="base units per 1M output tokens")
    pub.add_argument("--split", default="9000,0,1000", help="owner,contributors,operator basis points (sum 10000)")
    pub.add_argument("--datanet", type=int, default=0, help="Datanet id the adapter was trained from (0: none)")
    pub.add_argument("--publish-dir", type=Path, help="where the archive goes (default <data dir>/published)")
    pub.add_argument("--base-url", help="URL of --publish-dir on an HTTP server (default: a file:// URI)")
    pub.add_argument("--base-model", help="default: the served model name")
    pub.set_defaults(func=_publish)


def _sync_obj(settings):
    from attribution.db import open_database
    from attribution.ledger import Ledger, LedgerConfig
    from migrations import upgrade
    from node import keys
    from node.cli.node_cmd import chain_parts
    from node.registry_sync import RegistrySync

    if settings.node_id is None:
        raise ConfigError("node_id is not set; run `openlora node register` first")
    key = keys.load_key(settings.resolved_keystore_file)
    w3, dep, contract = chain_parts(settings)
    upgrade(settings.resolved_database_url)
    db = open_database(settings.resolved_database_url)
    me = Account.from_key(key).address
    cfg = LedgerConfig(settings.node_id, settings.operator_address or me, w3.eth.chain_id, dep.address("UsageSettlement"))
    return RegistrySync.from_deployment(w3, dep, Ledger(db, cfg, key), settings)


def _sync(args, settings) -> int:
    states = _sync_obj(settings).sync(download=args.download)
    if not states:
        print("no adapters registered for this base model")
    for name, state in states.items():
        print(f"{name:40} {state}")
    return 1 if any(s == "refused" or s.startswith("error") for s in states.values()) else 0


def _list(args, settings) -> int:
    sync = _sync_obj(settings)
    rows = sync.registered()
    if not rows:
        print(f"no adapters registered for base model {sync.base_model}")
        return 0
    print(f"{'ID':>4} {'NAME':30} {'IN/1M':>10} {'OUT/1M':>10} {'SPLIT o/c/op':>16} {'DATANET':>7} {'LOCAL':8} ACTIVE")
    for a in rows:
        local = "yes" if sync._local_hash(a.name) == a.content_hash else "no"
        split = f"{a.owner_bps}/{a.contributors_bps}/{a.operator_bps}"
        print(f"{a.adapter_id:>4} {a.name:30} {a.price_per_m_input:>10} {a.price_per_m_output:>10} {split:>16} "
              f"{a.datanet_id:>7} {local:8} {a.active}")
    return 0


def _publish(args, settings) -> int:
    from node import keys
    from node.chain.tx import Transactor
    from node.cli.node_cmd import chain_parts
    from node.registry import check_adapter_name, pack_adapter

    name = check_adapter_name(args.name)
    try:
        split = tuple(int(x) for x in args.split.split(","))
    except ValueError:
        split = ()
    if len(split) != 3 or any(b < 0 for b in split) or sum(split) != 10_000:
        raise ConfigError(f"--split must be three non-negative basis points summing to 10000, got {args.split!r}")
    if args.price_in < 0 or args.price_out < 0:
        raise ConfigError("prices must be non-negative integers")
    key = keys.load_key(settings.resolved_keystore_file)
    w3, _dep, contract = chain_parts(settings)
    out_dir = (args.publish_dir or settings.data_dir / "published").expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{name}.tar.gz"
    sha = pack_adapter(args.folder, archive)
    uri = f"{args.base_url.rstrip('/')}/{archive.name}" if args.base_url else archive.as_uri()
    base = args.base_model or settings.served_model_name or Path(settings.model).name
    registry = contract("AdapterRegistry")
    params = (name, base, bytes.fromhex(sha), uri, args.datanet, args.price_in, args.price_out, *split)
    receipt = Transactor(w3, Account.from_key(key)).send(registry.functions.registerAdapter(params), "registerAdapter")
    (event,) = registry.events.AdapterRegistered().process_receipt(receipt, errors=DISCARD)
    print(f"adapter {name} registered as id {event['args']['adapterId']}: {uri} (sha256 {sha})")
    return 0
