"""`openlora chain up|down|status` and `openlora deploy`: the local dev chain and contract deployment.

`chain up` starts anvil on the host and port of `rpc_url` (state kept in <data_dir>/chain/), deploys the
contracts unless the deployment file already matches the chain, and stays in the foreground until
Ctrl-C (`--detach`: leaves anvil running in the background; `chain down` stops it). `deploy` deploys
to whatever `rpc_url` points at and writes the deployment file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from urllib.parse import urlparse

from node.chain import anvil as anvil_mod
from node.chain.deploy import (
    DEFAULT_THAWING_PERIOD,
    deploy,
    deployer_account,
    deployment_problems,
    ensure_deployed,
    load_deployment,
)
from node.chain.errors import ChainError, DeploymentError, RpcUnavailable
from node.chain.tx import connect

LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "::1"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chain", help="run a local dev chain (anvil) with the contracts",
                       description="Run a local dev chain (anvil from npm) with the OpenLoRA contracts deployed.")
    csub = p.add_subparsers(dest="chain_command", metavar="ACTION")
    csub.required = True

    up = csub.add_parser("up", help="start anvil on rpc_url's port and deploy if needed",
                         description="Start anvil on the host and port of rpc_url, state persisted in "
                                     "<data_dir>/chain/, and deploy the contracts unless already deployed.")
    up.add_argument("--detach", action="store_true", help="leave anvil running in the background")
    up.add_argument("--thawing-period", type=int, default=DEFAULT_THAWING_PERIOD, metavar="SECONDS",
                    help=f"withdrawal thawing period for a new deployment (default {DEFAULT_THAWING_PERIOD})")
    up.add_argument("--json", action="store_true", help="print the result as JSON")
    up.set_defaults(func=_up)

    down = csub.add_parser("down", help="stop a detached anvil", description="Stop the anvil `chain up --detach` started.")
    down.set_defaults(func=_down)

    st = csub.add_parser("status", help="show the chain and the deployment",
                         description="Show whether rpc_url answers and whether the deployment file matches it.")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    dep = sub.add_parser("deploy", help="deploy the contracts to rpc_url",
                         description="Deploy the OpenLoRA contracts to rpc_url and write the deployment file.")
    dep.add_argument("--token", metavar="ADDRESS", help="ERC-20 to settle in (default: a new TestToken, local chains only)")
    dep.add_argument("--thawing-period", type=int, default=DEFAULT_THAWING_PERIOD, metavar="SECONDS",
                     help=f"withdrawal thawing period (default {DEFAULT_THAWING_PERIOD})")
    dep.add_argument("--owner", metavar="ADDRESS", help="may change the thawing period (default: the deployer)")
    dep.add_argument("--key-file", type=Path, metavar="FILE",
                     help="deployer private key (default: $OPENLORA_DEPLOYER_KEY; anvil's dev key on local chains)")
    dep.add_argument("--force", action="store_true", help="deploy even if the deployment file matches the chain")
    dep.add_argument("--json", action="store_true", help="print the deployment as JSON")
    dep.set_defaults(func=_deploy)


def _chain_dir(settings) -> Path:
    return Path(settings.data_dir) / "chain"


def _pid_file(settings) -> Path:
    return _chain_dir(settings) / "anvil.pid"


def _local_endpoint(rpc_url: str) -> tuple[str, int]:
    u = urlparse(rpc_url)
    if u.scheme not in ("http", "https") or u.hostname is None:
        raise ChainError(f"rpc_url {rpc_url!r} is not an http URL")
    if u.hostname not in LOCAL_HOSTS:
        raise ChainError(f"`chain up` runs a local anvil, but rpc_url points at {u.hostname}; use `openlora deploy`")
    return ("127.0.0.1" if u.hostname == "localhost" else u.hostname), (u.port or 8545)


def _print_deployment(dep, url: str, deployed_now: bool, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        print(json.dumps({"rpcUrl": url, "deployedNow": deployed_now, **(extra or {}), "deployment": dep.to_json()},
                         indent=2))
        return
    print(f"chain {dep.chain_id} at {url}: {'deployed now' if deployed_now else 'already deployed'} "
          f"(from block {dep.block})")
    for key, addr in dep.contracts.items():
        print(f"  {key:16} {addr}")
    for k, v in (extra or {}).items():
        print(f"  {k}: {v}")


def _up(args, settings) -> int:
    host, port = _local_endpoint(settings.rpc_url)
    dep_file = settings.resolved_deployment_file
    try:
        chain_id = anvil_mod.chain_id_at(settings.rpc_url, timeout=2.0)
    except RpcUnavailable:
        chain_id = None
    if chain_id is not None:
        # something already serves rpc_url (a detached anvil, or another dev chain): just deploy if needed
        if chain_id not in anvil_mod.LOCAL_CHAIN_IDS:
            raise ChainError(f"{settings.rpc_url} serves chain {chain_id}, not a local dev chain")
        w3 = connect(settings.rpc_url)
        dep, now = ensure_deployed(w3, deployer_account(chain_id), dep_file, thawing_period=args.thawing_period)
        _print_deployment(dep, settings.rpc_url, now, args.json, {"anvil": "already running", "deploymentFile": str(dep_file)})
        return 0

    chain_dir = _chain_dir(settings)
    node = anvil_mod.Anvil(host=host, port=port, state_file=chain_dir / "anvil-state.json",
                           log_file=chain_dir / "anvil.log", detach=args.detach,
                           pid_file=_pid_file(settings) if args.detach else None)
    node.start()
    try:
        w3 = connect(node.url)
        dep, now = ensure_deployed(w3, deployer_account(node.chain_id), dep_file, thawing_period=args.thawing_period)
    except BaseException:
        node.stop()
        raise
    extra = {"state": str(node.state_file), "deploymentFile": str(dep_file)}
    if args.detach:
        extra["pid"] = node.proc.pid
        _print_deployment(dep, node.url, now, args.json, extra)
        node.proc = None  # leave it running; `chain down` stops it
        return 0
    _print_deployment(dep, node.url, now, args.json, extra)
    try:
        # the hint is printed inside the try: a Ctrl-C right after reading it must still stop cleanly
        if not args.json:
            print("anvil running; Ctrl-C stops it (state is saved on the way out)", flush=True)
        while node.running():
            time.sleep(0.5)
        raise ChainError(f"anvil exited unexpectedly; see {node.log_file}")
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


def _down(args, settings) -> int:
    if anvil_mod.stop_pid_file(_pid_file(settings)):
        print("anvil stopped (state saved)")
    else:
        print("no detached anvil is running")
    return 0


def _status(args, settings) -> int:
    report: dict = {"rpcUrl": settings.rpc_url, "deploymentFile": str(settings.resolved_deployment_file)}
    pid = anvil_mod.read_pid_file(_pid_file(settings))
    if pid:
        report["detachedAnvilPid"] = pid["pid"]
    try:
        w3 = connect(settings.rpc_url, timeout=5.0)
        report.update(reachable=True, chainId=w3.eth.chain_id, block=w3.eth.block_number)
    except RpcUnavailable:
        report.update(reachable=False)
        w3 = None
    try:
        dep = load_deployment(settings.resolved_deployment_file)
        report["deployment"] = dep.to_json()
        if w3 is not None:
            problems = deployment_problems(w3, dep)
            report["deployed"] = not problems
            if problems:
                report["problems"] = problems
            else:
                from node.chain.client import ChainClient

                c = ChainClient(w3, dep)
                report["counts"] = {"datanets": c.datanet_count(), "adapters": c.adapter_count(),
                                    "nodes": c.node_count()}
    except DeploymentError as exc:
        report["deployed"] = False
        report["problems"] = [str(exc)]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if report["reachable"]:
        print(f"rpc {settings.rpc_url}: chain {report['chainId']}, block {report['block']}")
    else:
        print(f"rpc {settings.rpc_url}: not reachable (start one with `openlora chain up`)")
    if "detachedAnvilPid" in report:
        print(f"detached anvil: pid {report['detachedAnvilPid']}")
    if report.get("deployed"):
        print(f"deployment {settings.resolved_deployment_file}: on chain")
        for key, addr in report["deployment"]["contracts"].items():
            print(f"  {key:16} {addr}")
        counts = report["counts"]
        print(f"  {counts['datanets']} datanets, {counts['adapters']} adapters, {counts['nodes']} nodes")
    else:
        for problem in report.get("problems", ["not checked (rpc not reachable)"]):
            print(f"deployment: {problem}")
    return 0


def _deploy(args, settings) -> int:
    w3 = connect(settings.rpc_url)
    dep_file = settings.resolved_deployment_file
    if not args.force and dep_file.exists():
        try:
            existing = load_deployment(dep_file)
        except DeploymentError:
            existing = None
        if existing is not None and not deployment_problems(w3, existing):
            _print_deployment(existing, settings.rpc_url, False, args.json, {"deploymentFile": str(dep_file)})
            return 0
    key = None
    if args.key_file is not None:
        try:
            key = args.key_file.read_text().strip()
        except OSError as exc:
            raise DeploymentError(f"cannot read key file {args.key_file}: {exc}") from None
    account = deployer_account(w3.eth.chain_id, key)
    dep = deploy(w3, account, token=args.token, thawing_period=args.thawing_period, owner=args.owner)
    dep.save(dep_file)
    _print_deployment(dep, settings.rpc_url, True, args.json, {"deploymentFile": str(dep_file)})
    return 0
