"""`make demo`: the node's main job end to end, narrated, on a real model, a real local chain and a real
SQLite ledger.

    python -m node.demo [--model NAME|DIR] [--steps N] [--data-dir DIR] [--keep]

Steps (each is the real thing, run through the `openlora` CLI where an operator would use it):
  1. the model (pulled once into the user cache) and the demo's own config, key and data dir
  2. anvil from npm with its state persisted in the data dir, the contracts deployed (once)
  3. the node registered in NodeRegistry
  4. two Datanets from the shipped files datanets/*.jsonl, registered in DatanetRegistry
  5. an adapter trained on each (cached by Datanet hash + training parameters)
  6. both adapters published in AdapterRegistry, with a revenue split that pays the contributors
  7. `openlora serve` on a free loopback port
  8. a payer funded (test tokens), escrowed for the node, and signed in (API key)
  9. chat requests through the openai client: base model, each adapter, a fused mix
 10. `openlora settle --now`: a Merkle batch of the signed receipts settled on chain
 11. each contributor's reward from the ledger and from the chain, side by side
 12. one contributor claims on chain
A second run reuses what exists: the chain state (or redeploys cleanly when it is gone), the node
registration, the Datanets, the trained and published adapters.

The shipped Datanets name contributors whose keys nobody here holds; for a contributor to claim on the
local chain, the demo maps each shipped contributor to a demo key derived from a public seed (like
anvil's development keys: for a local chain only) and registers the mapped copy of the file (same
examples, same order; only the addresses differ).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.config import DEFAULT_MODEL, Settings

REPO = Path(__file__).resolve().parents[1]
SHIPPED = (("pirate-cooking", "pirate-chef"), ("formal-astronomy", "formal-astronomer"))
DEMO_PASSWORD = "openlora-demo-local-only"  # encrypts the demo's keystores; a demo on a local chain
CONTRIBUTOR_SEED = b"openlora-demo-contributor|"
PRICE_IN, PRICE_OUT = 20_000_000, 60_000_000  # base units per 1M tokens: 20 and 60 per token
BASE_PRICE_IN, BASE_PRICE_OUT = 5_000_000, 10_000_000
SPLIT = (5000, 4000, 1000)  # owner, contributors, operator (bps)
DEPOSIT_TOKENS = 10  # the payer escrows 10 tUSD
ETH = 10**20  # gas money on the local chain (anvil_setBalance)
# the attention projections only: the per-example gradients behind the attribution index (and each
# request's attribution) cost a backward pass plus a random projection linear in the LoRA's size,
# which all seven projections make 2.6x larger
DEMO_TARGETS = "q_proj,k_proj,v_proj,o_proj"
QUESTIONS = {"cooking": "How do I cook a trout?", "astronomy": "What is a nebula?"}


class DemoError(Exception):
    """A step failed; the message says which and why."""


_T0 = time.monotonic()


def say(step: str) -> None:
    print(f"\n==> {step}   [{time.monotonic() - _T0:.0f}s]", flush=True)


def info(text: str = "") -> None:
    print(f"    {text}" if text else "", flush=True)


def short(addr: str) -> str:
    return f"{addr[:6]}…{addr[-4:]}"


@dataclass
class Params:
    model: str
    steps: int
    lr: float
    rank: int
    targets: str
    batch_size: int
    max_len: int
    max_tokens: int
    examples: int | None
    data_dir: Path
    keep: bool


@dataclass
class Result:
    """What the demo did, written to <data dir>/demo-result.json (the test reads it)."""

    steps: list[str] = field(default_factory=list)
    deployed_now: bool = False
    node_registered_now: bool = False
    datanets: dict = field(default_factory=dict)  # name -> {"id", "hash", "created_now"}
    adapters: dict = field(default_factory=dict)  # name -> {"id", "trained_now", "published_now", ...}
    answers: list = field(default_factory=list)
    settlement: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    claim: dict | None = None
    seconds: float = 0.0


class Demo:
    def __init__(self, p: Params) -> None:
        self.p = p
        self.d = p.data_dir
        self.config = self.d / "config.toml"
        self.result = Result()
        self.node_proc: subprocess.Popen | None = None
        self.anvil_started = False
        from node.config import load_settings

        self.user = load_settings()  # the user's own settings: where the model cache is
        self.env = self._env()
        os.environ.clear()
        os.environ.update(self.env)  # the operator's shell: every `openlora` command reads this config

    # -- plumbing -------------------------------------------------------------------------------

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("OPENLORA_") and k[len("OPENLORA_"):].lower() in Settings.model_fields)}
        env.update(OPENLORA_CONFIG=str(self.config), OPENLORA_KEY_PASSWORD=DEMO_PASSWORD,
                   OMP_NUM_THREADS=str(os.cpu_count() or 1), PYTHONUNBUFFERED="1")
        env["PATH"] = os.pathsep.join([str(REPO / "node_modules" / ".bin"), env.get("PATH", "")])
        return env

    def cli(self, *args: str, show: bool = True, stream: bool = False) -> str:
        """`openlora ARGS` with the demo's config (its environment is the demo's own, set up in
        __init__); returns what it printed. It runs in this process (node.cli.main, the entry point of
        the `openlora` script), which spares a Python start and the torch/web3 imports per command.
        `stream`: its stderr (progress bars) goes straight to the terminal."""
        import contextlib
        import io

        from node.cli import main as openlora

        if show:
            info("$ openlora " + " ".join(args))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), (contextlib.nullcontext() if stream else contextlib.redirect_stderr(err)):
            try:
                code = openlora(list(args))
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
        if code == 130:
            raise KeyboardInterrupt
        if code != 0:
            msg = err.getvalue().strip() or out.getvalue().strip()
            raise DemoError(f"`openlora {' '.join(args)}` failed (exit {code}): {msg}")
        return out.getvalue()

    def step(self, name: str) -> None:
        self.result.steps.append(name)

    def write_config(self, **values) -> None:
        from node.cli.init import update_config

        update_config(self.config, **values)

    def read_config(self) -> dict:
        import tomllib

        try:
            return tomllib.loads(self.config.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return {}

    def drop_config_keys(self, *keys: str) -> None:
        from node.cli.init import _toml_value

        data = {k: v for k, v in self.read_config().items() if k not in keys}
        self.config.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in sorted(data.items())))

    # -- the steps ------------------------------------------------------------------------------

    def run(self) -> Result:
        started = time.monotonic()
        self.setup()
        self.chain_up()
        self.register_node()
        datanets = self.datanets()
        trained = self.train(datanets)
        self.publish(datanets, trained)
        self.serve()
        client, payer = self.payer()
        self.chat(client)
        self.settle()
        self.rewards()
        self.claim()
        self.result.seconds = round(time.monotonic() - started, 1)
        return self.result

    def setup(self) -> None:
        from node import models

        say("Setting up: the model, the demo's data dir, config and node key")
        user = self.user
        if Path(self.p.model).expanduser().is_dir():
            model_dir = models.resolve(self.p.model, user.models_dir)
        else:
            info(f"pulling {self.p.model} into {user.models_dir} (once; later runs find it there)")
            model_dir = models.pull(self.p.model, user.models_dir)
        self.model_ref = str(model_dir) if Path(self.p.model).expanduser().is_dir() else self.p.model
        self.model_dir = model_dir
        self.base_name = Path(self.model_ref).name
        info(f"model {self.base_name}: {model_dir}")
        self.d.mkdir(parents=True, exist_ok=True)
        info(f"data dir {self.d} (ledger, keys, chain state, adapters); config {self.config}")
        keystore = self.d / "node-key.json"
        if keystore.exists():
            info("node key exists; reusing it")
        else:
            self.cli("init", "--data-dir", str(self.d))
        from node import keys

        self.node_address = keys.keystore_address(keystore)
        from eth_utils import to_checksum_address

        self.node_address = to_checksum_address(self.node_address)
        info(f"node key {self.node_address} (encrypted keystore; the demo's password is set in its environment)")
        self.node_port = _free_port()
        self.write_config(
            data_dir=str(self.d), keystore_file=str(keystore), cache_dir=str(user.cache_dir), model=self.model_ref,
            device="cpu", host="127.0.0.1", port=self.node_port, log_json=False, log_level="warning",
            settle_confirmations=1, settle_interval_s=3600.0, registry_sync_s=5.0, escrow_cache_s=0.0,
            base_price_per_m_input=BASE_PRICE_IN, base_price_per_m_output=BASE_PRICE_OUT,
            engine_max_num_seqs=4, engine_num_lora_slots=4, engine_max_lora_rank=max(16, 2 * self.p.rank))
        self.step("setup")

    def chain_up(self) -> None:
        from node.chain import anvil as anvil_mod

        say("Starting the local chain (anvil from npm) and deploying the contracts")
        pid = anvil_mod.read_pid_file(self.d / "chain" / "anvil.pid")
        url = pid["url"] if pid else f"http://127.0.0.1:{anvil_mod.free_port()}"
        if pid:
            info(f"an anvil this demo left running (--keep) answers at {url}; reusing it")
        self.write_config(rpc_url=url)
        state = self.d / "chain" / "anvil-state.json"
        if state.exists() and not pid:
            info(f"restoring the chain state saved by the last run ({state})")
        out = json.loads(self.cli("chain", "up", "--detach", "--json", "--thawing-period", "60"))
        self.anvil_started = True
        self.rpc_url = out["rpcUrl"]
        dep = out["deployment"]
        self.result.deployed_now = bool(out["deployedNow"])
        info(f"chain {dep['chainId']} at {self.rpc_url}: "
             + ("contracts deployed now" if out["deployedNow"] else "contracts already deployed (state reused)"))
        for k, a in dep["contracts"].items():
            info(f"  {k:16} {a}")
        if out["deployedNow"]:
            self._forget_old_chain()
        from node.chain.client import ChainClient

        self.chain = ChainClient.connect(self.rpc_url, self.d / "deployment.json")
        self.decimals = self.chain.token.functions.decimals().call()
        self.symbol = self.chain.token.functions.symbol().call()
        self._fund(self.node_address)
        self.step("chain")

    def _forget_old_chain(self) -> None:
        """A new deployment: whatever the ledger, the store and the config knew of an older chain goes."""
        import shutil

        old = [p for p in (self.d / "ledger.db", self.d / "settlement-journal", self.d / "adapters",
                           self.d / "published") if p.exists()]
        old += list(self.d.glob("ledger.db-*"))
        if old or "node_id" in self.read_config():
            info("new chain: clearing the ledger, adapter store and node registration of the previous chain")
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.drop_config_keys("node_id")

    def _fund(self, address: str) -> None:
        from node.chain.anvil import rpc_request

        rpc_request(self.rpc_url, "anvil_setBalance", [address, hex(ETH)])

    def register_node(self) -> None:
        say("Registering this node in NodeRegistry")
        node_id = self.read_config().get("node_id")
        if node_id is not None:
            signer = self.chain.signer_of(int(node_id))
            if signer.lower() == self.node_address.lower():
                info(f"already registered as node {node_id} (signer {short(signer)})")
                self.node_id = int(node_id)
                self.step("register")
                return
            info(f"node {node_id} on this chain is not ours; registering again")
            self.drop_config_keys("node_id")
        out = self.cli("node", "register", "--endpoint", f"http://127.0.0.1:{self.node_port}")
        info(out.strip())
        self.node_id = int(self.read_config()["node_id"])
        self.result.node_registered_now = True
        self.step("register")

    def datanets(self) -> dict:
        from eth_account import Account

        from node.chain.client import b32
        from node.datanet import load_datanet

        say("Creating two Datanets from the shipped files (three contributors each)")
        info("The shipped files name contributors whose keys are not here; each is mapped to a demo key")
        info("(derived from a public seed, local chain only) so that a contributor can claim at the end.")
        out = {}
        (self.d / "datanets").mkdir(exist_ok=True)
        self.contributor_keys: dict[str, str] = {}
        for stem, _adapter in SHIPPED:
            src = REPO / "datanets" / f"{stem}.jsonl"
            shipped = load_datanet(src)
            raws = [raw for raw in src.read_text().splitlines() if raw.strip()]
            if self.p.examples and self.p.examples < len(raws):  # quick runs: a spread-out subset
                raws = [raws[i * len(raws) // self.p.examples] for i in range(self.p.examples)]
                shipped = load_datanet(_write(self.d / "datanets" / f".{stem}.subset.jsonl", raws))
            lines = []
            for raw in raws:
                obj = json.loads(raw)
                key = "0x" + hashlib.sha3_256(CONTRIBUTOR_SEED + obj["contributor"].lower().encode()).hexdigest()
                addr = Account.from_key(key).address
                self.contributor_keys[addr] = key
                obj["contributor"] = addr
                lines.append(json.dumps(obj, ensure_ascii=False))
            path = self.d / "datanets" / f"{stem}.jsonl"
            path.write_text("\n".join(lines) + "\n")
            d = load_datanet(path)
            info(f"{stem}: {len(d.examples)} examples, content hash {d.content_hash[:18]}…")
            for (orig, n), addr in zip(shipped.counts().items(), d.counts()):
                info(f"  contributor {short(orig)} in the shipped file -> demo key {addr}  ({n} examples)")
            existing = None
            for i in range(1, self.chain.datanet_count() + 1):
                dn = self.chain.get_datanet(i)
                if dn.content_hash == b32(d.content_hash) and dn.owner.lower() == self.node_address.lower():
                    existing = i
                    break
            if existing is not None:
                info(f"  already registered as Datanet {existing}")
                out[stem] = {"id": existing, "hash": d.content_hash, "path": path, "created_now": False,
                             "contributors": d.contributors}
            else:
                text = self.cli("datanet", "create", str(path))
                m = re.search(r"datanet (\d+) created", text)
                if not m:
                    raise DemoError(f"unexpected `datanet create` output: {text!r}")
                info("  " + text.strip())
                out[stem] = {"id": int(m.group(1)), "hash": d.content_hash, "path": path, "created_now": True,
                             "contributors": d.contributors}
        self.result.datanets = {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()}
                                for k, v in out.items()}
        self.step("datanets")
        return out

    def _train_key(self, datanet_hash: str) -> str:
        doc = json.dumps({"datanet": datanet_hash, "base": self.base_name, "steps": self.p.steps, "lr": self.p.lr,
                          "rank": self.p.rank, "batch": self.p.batch_size, "max_len": self.p.max_len, "seed": 0,
                          "targets": self.p.targets}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:12]

    def train(self, datanets: dict) -> dict:
        say(f"Training an adapter on each Datanet (rank {self.p.rank} on {self.p.targets}, {self.p.steps} steps, "
            f"lr {self.p.lr}, {os.cpu_count()} CPU threads)")
        out = {}
        for stem, name in SHIPPED:
            dn = datanets[stem]
            folder = self.d / "trained" / f"{stem}-{self._train_key(dn['hash'])}"
            report = folder.with_name(folder.name + ".training") / "training.json"
            if (folder / "adapter_model.safetensors").exists() and (folder / "attribution_index.safetensors").exists() \
                    and report.exists():
                s = json.loads(report.read_text())
                info(f"{name}: cached from an earlier run (same Datanet hash and training parameters): {folder}")
                info(f"  loss {s['losses'][0]:.2f} -> {s['losses'][-1]:.2f}, trained in {s['train_seconds']:.0f}s then")
                out[stem] = {"folder": folder, "trained_now": False}
                continue
            info(f"{name}: training on {dn['path'].name} (the bar below is the trainer's)")
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            t0 = time.monotonic()
            text = self.cli("adapter", "train", "--datanet", str(dn["path"]), "--base", self.model_ref,
                            "--rank", str(self.p.rank), "--steps", str(self.p.steps), "--lr", str(self.p.lr),
                            "--batch-size", str(self.p.batch_size), "--max-len", str(self.p.max_len),
                            "--targets", self.p.targets,
                            "--out", str(folder), "--force", stream=True)
            for line in text.strip().splitlines():
                info("  " + line)
            info(f"  done in {time.monotonic() - t0:.0f}s (training + the attribution index over every example)")
            out[stem] = {"folder": folder, "trained_now": True}
        self.step("train")
        return out

    def publish(self, datanets: dict, trained: dict) -> None:
        import tempfile

        from node.registry import pack_adapter

        say(f"Publishing both adapters: price {PRICE_IN // 10**6} / {PRICE_OUT // 10**6} base units per input / "
            f"output token, split owner {SPLIT[0] // 100}% / contributors {SPLIT[1] // 100}% / operator "
            f"{SPLIT[2] // 100}%")
        registered = {a.name: a for a in self.chain.iter_adapters()}
        key = None
        for stem, name in SHIPPED:
            folder = trained[stem]["folder"]
            with tempfile.TemporaryDirectory() as tmp:
                sha = pack_adapter(folder, Path(tmp) / "a.tar.gz")
            entry = {"trained_now": trained[stem]["trained_now"], "folder": str(folder), "sha256": sha,
                     "datanet": datanets[stem]["id"]}
            have = registered.get(name)
            if have is not None and have.content_hash.hex() == sha and have.active:
                info(f"{name}: already registered as adapter {have.adapter_id} with this content")
                entry.update(id=have.adapter_id, published_now=False)
            elif have is not None:
                # the name belongs to its first registration: publish the new content under it
                from node import keys
                from node.chain.client import ChainClient

                key = key or keys.load_key(self.d / "node-key.json", DEMO_PASSWORD)
                pub = self.d / "published"
                pub.mkdir(exist_ok=True)
                pack_adapter(folder, pub / f"{name}.tar.gz")
                client = ChainClient.connect(self.rpc_url, self.d / "deployment.json", key)
                client.update_adapter_content(have.adapter_id, (pub / f"{name}.tar.gz").as_uri(), sha)
                info(f"{name}: adapter {have.adapter_id} updated to the newly trained content (sha256 {sha[:12]}…)")
                entry.update(id=have.adapter_id, published_now=True)
            else:
                text = self.cli("adapters", "publish", str(folder), "--name", name, "--price-in", str(PRICE_IN),
                                "--price-out", str(PRICE_OUT), "--split", ",".join(map(str, SPLIT)),
                                "--datanet", str(datanets[stem]["id"]))
                m = re.search(r"registered as id (\d+)", text)
                if not m:
                    raise DemoError(f"unexpected `adapters publish` output: {text!r}")
                info("  " + text.strip())
                entry.update(id=int(m.group(1)), published_now=True)
            self.result.adapters[name] = entry
        self.step("publish")

    def serve(self) -> None:
        import httpx

        say(f"Starting the node: `openlora serve` on 127.0.0.1:{self.node_port}")
        log = open(self.d / "node.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.node_proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve"], env=self.env, cwd=REPO,
                                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True)
        finally:
            log.close()
        self.url = f"http://127.0.0.1:{self.node_port}"
        t0 = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while True:
                if self.node_proc.poll() is not None:
                    raise DemoError(f"the node exited with code {self.node_proc.returncode}; "
                                    f"log: {self.d / 'node.log'}\n{_tail(self.d / 'node.log')}")
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > 600:
                    raise DemoError(f"the node did not become ready in 10 minutes; log: {self.d / 'node.log'}")
                time.sleep(0.5)
        info(f"ready in {time.monotonic() - t0:.0f}s (model loaded, ledger migrated, registry mirrored); "
             f"log: {self.d / 'node.log'}")
        self.step("serve")

    def payer(self):
        import httpx
        import openai
        from eth_account import Account
        from eth_account.messages import encode_defunct

        from attribution.eip712 import Domain
        from node.payments import sign_voucher

        say("Funding a payer, escrowing for this node, and signing in")
        acct = Account.create()
        payer_key = "0x" + bytes(acct.key).hex()
        self._fund(acct.address)
        amount = DEPOSIT_TOKENS * 10**self.decimals
        client = self.chain.with_account(payer_key)
        client.mint(acct.address, amount)
        balance = client.deposit(self.node_id, amount)
        info(f"payer {acct.address}: minted {DEPOSIT_TOKENS} {self.symbol} (test token) and deposited them: "
             f"escrow {balance} base units = {self.tokens(balance)} for node {self.node_id}")
        with httpx.Client(base_url=self.url, timeout=60) as c:
            ch = c.post("/v1/auth/challenge", json={"address": acct.address})
            ch.raise_for_status()
            ch = ch.json()
            sig = Account.sign_message(encode_defunct(text=ch["message"]), payer_key).signature.hex()
            d = ch["eip712_domain"]
            voucher = sign_voucher(Domain(d["chainId"], d["verifyingContract"]), payer_key, ch["node_id"], amount)
            r = c.post("/v1/auth/login", json={"message": ch["message"], "signature": "0x" + sig.removeprefix("0x"),
                                               "voucher": voucher.to_json()})
            if r.status_code != 200:
                raise DemoError(f"sign-in failed: {r.status_code} {r.text}")
            api_key = r.json()["api_key"]
        info(f"signed in (EIP-4361 message + a voucher of up to {self.tokens(amount)}); got an API key (not shown)")
        self.step("payer")
        oa = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=600)
        return oa, acct.address

    def chat(self, client) -> None:
        import httpx

        from attribution.db import open_database

        pirate, astro = (name for _, name in SHIPPED)
        say("Chat requests through the openai client (greedy decoding, the same questions)")
        self.rewards_before = self._ledger_settled()
        runs = [("base model", self.base_name, None, QUESTIONS["cooking"]),
                (pirate, pirate, None, QUESTIONS["cooking"]),
                ("base model", self.base_name, None, QUESTIONS["astronomy"]),
                (astro, astro, None, QUESTIONS["astronomy"]),
                (f"fused mix {pirate} 0.5 + {astro} 0.5", self.base_name,
                 [{"name": pirate, "weight": 0.5}, {"name": astro, "weight": 0.5}], QUESTIONS["astronomy"])]
        db = open_database(f"sqlite:///{self.d / 'ledger.db'}")
        try:
            for label, model, mix, q in runs:
                t0 = time.monotonic()
                extra = {"adapters": mix} if mix else None
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                   max_tokens=self.p.max_tokens, temperature=0, extra_body=extra)
                secs = time.monotonic() - t0
                text = (r.choices[0].message.content or "").strip()
                rid = r.model_extra["receipt_id"]
                doc = self._receipt(rid)
                cost = int(doc["typedData"]["message"]["cost"])
                shares = _influence(db, rid)
                print(f"\n    [{label}] Q: {q}")
                for line in _wrap(text, 92):
                    print(f"      {line}")
                info(f"  {r.usage.prompt_tokens}+{r.usage.completion_tokens} tokens in {secs:.1f}s, cost {cost} base "
                     f"units = {self.tokens(cost)}, receipt {rid[:14]}…")
                for adapter_id, rows in shares.items():
                    info(f"  attribution (adapter {adapter_id}): "
                         + ", ".join(f"{short(a)} {bps / 100:.1f}%" for a, bps in rows))
                self.result.answers.append({"label": label, "question": q, "answer": text, "receipt": rid,
                                            "cost": cost, "shares": {str(k): v for k, v in shares.items()}})
        finally:
            db.dispose()
        self.step("chat")

    def _receipt(self, rid: str) -> dict:
        """The signed receipt; the node answers before it books (and attributes) a request, so the
        receipt may take a moment to appear."""
        import httpx

        deadline = time.monotonic() + 600
        while True:
            r = httpx.get(f"{self.url}/v1/receipts/{rid}", timeout=60)
            if r.status_code == 200:
                return r.json()
            if r.status_code != 404 or time.monotonic() > deadline:
                raise DemoError(f"receipt {rid}: {r.status_code} {r.text}")
            time.sleep(0.5)

    def settle(self) -> None:
        say("Settling: the node's signed receipts go on chain as one Merkle batch")
        text = self.cli("settle", "--now", "--timeout", "120")
        for line in text.strip().splitlines():
            info("  " + line)
        self.result.settlement = text.strip().splitlines()
        self.step("settle")

    def _ledger_settled(self) -> dict[str, int]:
        from attribution import queries
        from attribution.db import open_database

        if not (self.d / "ledger.db").exists():
            return {}
        db = open_database(f"sqlite:///{self.d / 'ledger.db'}")
        try:
            return {a: queries.rewards(db, a).settled for a in [*self.contributor_keys, self.node_address]}
        finally:
            db.dispose()

    def _claimed_on_chain(self, address: str) -> int:
        dep_block = self.chain.deployment.block
        logs = self.chain.settlement.events.Claimed().get_logs(from_block=dep_block,
                                                               argument_filters={"payee": address})
        return sum(int(ev["args"]["amount"]) for ev in logs)

    def rewards(self) -> None:
        say("Rewards: the ledger (SQLite) and the chain (UsageSettlement), per payee")
        after = self._ledger_settled()
        info(f"{'payee':44} {'this run':>9} {'ledger settled':>15} {'chain claimable+claimed':>24}  agree")
        rows = []
        labels = {a: f"contributor {short(a)}" for a in self.contributor_keys}
        labels[self.node_address] = "node (adapter owner + operator)"
        for addr, label in labels.items():
            ledger = after.get(addr, 0)
            chain = self.chain.claimable(addr) + self._claimed_on_chain(addr)
            run = ledger - self.rewards_before.get(addr, 0)
            ok = ledger == chain
            rows.append({"address": addr, "label": label, "this_run": run, "ledger": ledger, "chain": chain,
                         "agree": ok})
            info(f"{label:44} {run:>9} {ledger:>15} {chain:>24}  {'yes' if ok else 'NO'}")
        info(f"(base units; 1 {self.symbol} = {10**self.decimals:,} base units. Totals include earlier demo runs "
             "on this chain.)")
        self.result.rewards = rows
        if not all(r["agree"] for r in rows):
            raise DemoError("the ledger and the chain disagree on a reward (see the table above)")
        self.step("rewards")

    def claim(self) -> None:
        from eth_account import Account

        from node import keys

        say("A contributor claims their reward on chain")
        candidates = sorted(((self.chain.claimable(a), a) for a in self.contributor_keys), reverse=True)
        amount, addr = candidates[0]
        if amount == 0:
            info("no contributor has anything claimable: no request was attributed to a contributor "
                 "(the contributors' part went to the adapter owner). Nothing to claim.")
            self.result.claim = None
            return
        keystore = self.d / "keys" / f"{addr}.json"
        if not keystore.exists():
            keys.create_keystore(keystore, DEMO_PASSWORD, private_key=self.contributor_keys[addr])
        assert Account.from_key(self.contributor_keys[addr]).address == addr
        self._fund(addr)
        before = self.chain.token_balance(addr)
        text = self.cli("claim", "--keystore", str(keystore))
        info("  " + text.strip())
        after = self.chain.token_balance(addr)
        info(f"{addr}: {self.symbol} balance {self.tokens(before)} -> {self.tokens(after)} "
             f"(+{after - before} base units); claimable now {self.chain.claimable(addr)}")
        self.result.claim = {"address": addr, "amount": amount, "balance_before": before, "balance_after": after}
        self.step("claim")

    def tokens(self, units: int) -> str:
        return f"{units / 10**self.decimals:.6f}".rstrip("0").rstrip(".") + f" {self.symbol}"

    # -- the end --------------------------------------------------------------------------------

    def cleanup(self) -> None:
        if self.node_proc is not None and self.node_proc.poll() is None:
            say("Stopping the node")
            self.node_proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.node_proc.wait(30)
            except subprocess.TimeoutExpired:
                self.node_proc.kill()
                self.node_proc.wait(10)
        self.node_proc = None
        if self.anvil_started:
            if self.p.keep:
                info(f"anvil left running (--keep) at {self.rpc_url}; `OPENLORA_CONFIG={self.config} "
                     "openlora chain down` stops it")
            else:
                say("Stopping anvil (its state is saved for the next run)")
                try:
                    info(self.cli("chain", "down", show=False).strip())
                except (DemoError, subprocess.TimeoutExpired) as exc:
                    info(f"could not stop anvil: {exc}")
            self.anvil_started = False


# -- helpers ----------------------------------------------------------------------------------------

def _free_port() -> int:
    from node.chain.anvil import free_port

    return free_port()


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return [line for para in text.splitlines() for line in (textwrap.wrap(para, width) or [""])]


def _influence(db, request_id: str) -> dict[int, list[tuple[str, int]]]:
    from sqlalchemy import select

    from attribution import models as m

    with db.reader.begin() as s:
        rows = s.execute(select(m.ContributorInfluence.adapter_id, m.Contributor.address,
                                m.ContributorInfluence.share_bps)
                         .join(m.Contributor, m.Contributor.id == m.ContributorInfluence.contributor_id)
                         .where(m.ContributorInfluence.request_id == request_id)
                         .order_by(m.ContributorInfluence.adapter_id, m.ContributorInfluence.share_bps.desc())).all()
    out: dict[int, list[tuple[str, int]]] = {}
    for adapter_id, addr, bps in rows:
        out.setdefault(int(adapter_id), []).append((addr, int(bps)))
    return out


def default_data_dir() -> Path:
    return REPO / ".data" / "demo"


def parse_args(argv: list[str] | None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m node.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or HF-format directory (default {DEFAULT_MODEL})")
    ap.add_argument("--steps", type=int, default=40, help="training steps per adapter (default 40)")
    ap.add_argument("--lr", type=float, default=8e-3, help="peak learning rate (default 8e-3)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--targets", default=DEMO_TARGETS, help=f"LoRA target modules (default {DEMO_TARGETS})")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=96, help="tokens per training example (default 96)")
    ap.add_argument("--max-tokens", type=int, default=40, help="tokens per answer (default 40)")
    ap.add_argument("--examples", type=int, help="use only this many examples of each Datanet, spread over "
                    "the file (quick runs and tests; default: all)")
    ap.add_argument("--data-dir", type=Path, default=None, help="demo data dir (default <repo>/.data/demo)")
    ap.add_argument("--keep", action="store_true", help="leave anvil running at the end")
    a = ap.parse_args(argv)
    return Params(a.model, a.steps, a.lr, a.rank, a.targets, a.batch_size, a.max_len, a.max_tokens, a.examples,
                  (a.data_dir or default_data_dir()).expanduser().resolve(), a.keep)


def main(argv: list[str] | None = None) -> int:
    p = parse_args(argv)
    demo = Demo(p)
    t0 = time.monotonic()
    code = 0
    try:
        demo.run()
        say(f"Done in {time.monotonic() - t0:.0f}s. Steps: {', '.join(demo.result.steps)}")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", flush=True)
        code = 130
    except Exception as exc:  # every failure is reported as one readable line, after cleanup
        print(f"\ndemo failed: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        try:
            demo.cleanup()
        except KeyboardInterrupt:
            demo.cleanup()
        demo.result.seconds = round(time.monotonic() - t0, 1)
        if p.data_dir.exists():
            (p.data_dir / "demo-result.json").write_text(json.dumps(
                {**demo.result.__dict__, "exit_code": code, "at": dt.datetime.now(dt.UTC).isoformat()},
                indent=2, default=str) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
