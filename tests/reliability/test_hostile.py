"""Hostile input against the paid node (real uvicorn, tiny model, real anvil and SQLite): schema-driven
fuzzing of every endpoint (schemathesis) with no 5xx and no ledger change from rejected requests; then
targeted cases: oversized prompts, out-of-range parameters, invalid UTF-8, path-traversing adapter names,
registry entries pointing at link-local / private addresses (refused before any connection: outbound
connects to anything but loopback are made to fail in this process), archives with bad hashes, wrong
shapes, huge declared tensors and pickles, forged / replayed / lowered vouchers and API keys, and
concurrent spends racing for one escrow."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sqlite3
import struct
import sys
import tarfile
import io
from pathlib import Path

import httpx
import pytest
import schemathesis
from eth_account import Account
from hypothesis import HealthCheck, settings as hsettings
from schemathesis import GenerationMode

from attribution.eip712 import Domain
from chainkit import BASE_MODEL, send
from harness import record
from node.payments import VOUCHER_HEADER, encode_voucher_header, sign_voucher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node" / "payments"))
from test_http import Server  # noqa: E402

CHAT = "/v1/chat/completions"
TRACKED = ("requests", "receipts", "request_credits", "payer_vouchers", "api_keys", "settlement_batches",
           "batch_receipts", "payee_balances", "usage_rollups")


@pytest.fixture(scope="module")
def hostile_node(chain, tiny_llama_dir, tmp_path_factory):
    from node import keys
    from node.app import create_app
    from node.config import Settings

    root = tmp_path_factory.mktemp("hostile-node")
    os.environ[keys.PASSWORD_ENV] = "pw"
    keys.create_keystore(root / "node-key.json", "pw", private_key=chain.node_key)
    chain.extra["deployment"].save(root / "deployment.json")
    (root / "store").mkdir()
    settings = Settings(model=str(tiny_llama_dir), served_model_name=BASE_MODEL, adapter_dir=root / "store",
                        dev=False, device="cpu", data_dir=root, node_id=chain.node_id, rpc_url=chain.anvil.url,
                        deployment_file=root / "deployment.json", keystore_file=root / "node-key.json",
                        settle_confirmations=1, settle_interval_s=3600, registry_sync_s=3600,
                        base_price_per_m_input=1_000_000, base_price_per_m_output=2_000_000, escrow_cache_s=0,
                        engine_max_num_seqs=8, engine_num_lora_slots=2, engine_max_lora_rank=8, log_json=False,
                        max_request_bytes=64 * 1024)
    server = Server(create_app(settings))
    try:
        yield server, root
    finally:
        server.stop()
        os.environ.pop(keys.PASSWORD_ENV, None)


@pytest.fixture
def no_outbound(monkeypatch):
    """Any connect to a non-loopback address fails here, and is counted: a refusal must come first."""
    attempts = []
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if isinstance(address, tuple) and not (host.startswith("127.") or host in ("::1", "localhost")):
            attempts.append(host)
            raise ConnectionRefusedError(f"test guard: no outbound connection to {host}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def counts(root: Path) -> dict:
    con = sqlite3.connect(f"file:{root / 'ledger.db'}?mode=ro", uri=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TRACKED}
    finally:
        con.close()


def voucher(chain, key, value, ts=None):
    dom = Domain(chain.chain_id, chain.settlement.address)
    return {VOUCHER_HEADER: encode_voucher_header(sign_voucher(dom, key, chain.node_id, value, ts))}


# -- schema-driven fuzzing ----------------------------------------------------------------------------

FUZZ = {"cases": 0, "statuses": {}, "operations": 0}
EXAMPLES = 20  # per operation and per mode (schema-valid and schema-violating)


def test_fuzz_every_endpoint_no_5xx_and_rejections_change_nothing(hostile_node):
    """Every operation of the served OpenAPI schema, with cases schemathesis generates from it (valid and
    invalid ones): never a 5xx, and a refused request leaves the ledger as it was."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    server, root = hostile_node
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        op = result.ok()
        FUZZ["operations"] += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hsettings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                       database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                before = counts(root)
                try:
                    response = case.call(base_url=server.url, timeout=60)
                except (UnicodeEncodeError, ValueError):  # a header the HTTP client itself will not send
                    return
                FUZZ["cases"] += 1
                FUZZ["statuses"][response.status_code] = FUZZ["statuses"].get(response.status_code, 0) + 1
                assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
                if response.status_code >= 400:
                    assert counts(root) == before, f"{case.method} {case.formatted_path} was refused but changed the ledger"
                    assert "error" in response.json() or "detail" in response.json()

            try:
                run()
            except Unsatisfiable:  # nothing in this operation can violate the schema (no parameters, no body)
                continue
            except Exception as exc:  # collect every operation's failure, then report them together
                failures.append(f"{op.label} [{mode.value}]: {exc}"[:600])
    assert not failures, "\n".join(failures)


def test_fuzz_summary_is_recorded(hostile_node):
    # runs after the parametrized fuzz cases of this module (file order)
    assert FUZZ["cases"] > 0
    record("input", "schema-driven fuzzing (schemathesis)", f"{FUZZ['cases']} generated requests (schema-valid and "
           f"schema-violating) over {FUZZ['operations']} operations of the served OpenAPI schema",
           f"no 5xx; statuses {dict(sorted(FUZZ['statuses'].items()))}; refused requests left the ledger unchanged")


# -- targeted hostile input ---------------------------------------------------------------------------

def test_oversized_out_of_range_and_invalid_utf8_are_4xx_and_change_nothing(hostile_node, chain):
    server, root = hostile_node
    key = chain.payer(deposit=10**9)
    hdr = voucher(chain, key, 10**9)
    before = counts(root)
    base = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = {
        "prompt longer than the context": ({**base, "messages": [{"role": "user", "content": "word " * 3000}]}, 413),
        "body over max_request_bytes": ({**base, "messages": [{"role": "user", "content": "x" * 70_000}]}, 413),
        "max_tokens past the context": ({**base, "max_tokens": 10**9}, 400),
        "negative max_tokens": ({**base, "max_tokens": -1}, 400),
        "temperature -1": ({**base, "temperature": -1}, 400),
        "top_p 7": ({**base, "top_p": 7}, 400),
        "n 10^6": ({**base, "n": 10**6}, 400),
        "top_logprobs 10^4": ({**base, "logprobs": True, "top_logprobs": 10**4}, 400),
        "presence_penalty 1e308": ({**base, "presence_penalty": 1e308}, 400),
        "seed 2^80": ({**base, "seed": 2**80}, 400),
        "stop with 10^3 strings": ({**base, "stop": ["a"] * 1000}, 400),
        "messages not a list": ({**base, "messages": "hi"}, 400),
    }
    seen = {}
    with httpx.Client(base_url=server.url, timeout=60, headers=hdr) as c:
        for what, (body, want) in cases.items():
            r = c.post(CHAT, json=body)
            seen[what] = r.status_code
            assert r.status_code < 500 and r.status_code in (want, 400, 413, 422), (what, r.status_code, r.text[:200])
            assert r.json()["error"]["message"]
        for raw in (b'{"model": "\xff\xfe", "messages": []}', b'{"model": "smollm2-135m-instruct", "messages": [{"role": '
                    b'"user", "content": "\xc3\x28"}]}', b"\x00\x01\x02", b'{"model": "a\\ud800"}'):
            r = c.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
            seen[f"bytes {raw[:12]!r}"] = r.status_code
            assert 400 <= r.status_code < 500, (raw, r.status_code, r.text[:200])
        assert c.post(CHAT, json=base).status_code == 200  # the node still serves
    after = counts(root)
    assert {k: after[k] - before[k] for k in ("requests", "receipts")} == {"requests": 1, "receipts": 1}
    record("input", "oversized prompts, out-of-range parameters, invalid UTF-8",
           "; ".join(cases) + "; 4 raw bodies with invalid UTF-8 / lone surrogates / binary",
           f"all 4xx in OpenAI error shape ({sorted(set(seen.values()))}), no booking, node keeps serving")


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", "a/../../b", "/etc/passwd", "%2e%2e%2fetc", "x" * 300,
                                  "nul\x00byte", "unknown-adapter"])
def test_unknown_or_path_traversing_adapter_names_are_404_and_touch_nothing(hostile_node, chain, name, no_outbound):
    server, root = hostile_node
    key = chain.payer(deposit=10**9)
    before = counts(root)
    listing = sorted(p.name for p in (root / "store").iterdir())
    r = httpx.post(server.url + CHAT, json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                   headers=voucher(chain, key, 10**9), timeout=60)
    assert r.status_code in (400, 404, 422), (r.status_code, r.text)
    assert counts(root) == before and sorted(p.name for p in (root / "store").iterdir()) == listing
    assert not no_outbound
    if name == "unknown-adapter":
        record("input", "unknown or path-traversing adapter names",
               "model = ../../etc/passwd, .., a/../../b, /etc/passwd, %2e%2e%2fetc, 300 chars, NUL byte, unknown",
               "400/404/422 in OpenAI shape; nothing reserved or booked; adapter store unchanged; no outbound connection")


def _register(chain, owner, name, uri, sha: bytes):
    send(chain.w3, owner, chain.adapters.functions.registerAdapter(
        (name, BASE_MODEL, sha, uri, 0, 1_000_000, 1_000_000, 10000, 0, 0)))


@pytest.mark.parametrize("uri", ["http://169.254.169.254/latest/meta-data/adapter.tgz", "http://10.0.0.7/a.tgz",
                                 "http://[fd00::1]/a.tgz", "http://[::ffff:169.254.169.254]/a.tgz",
                                 "http://0x7f000001.nip.invalid/a.tgz", "file:///etc/passwd"])
def test_registry_uris_to_private_or_link_local_addresses_are_refused_before_connecting(hostile_node, chain, uri,
                                                                                      no_outbound):
    server, root = hostile_node
    owner = chain.anvil.funded_key()
    name = "ssrf-" + hashlib.sha256(uri.encode()).hexdigest()[:8]
    _register(chain, owner, name, uri, hashlib.sha256(b"x").digest())
    key = chain.payer(deposit=10**9)
    before = counts(root)
    r = httpx.post(server.url + CHAT, json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                   headers=voucher(chain, key, 10**9), timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] in ("adapter_unavailable", "model_not_found"), r.text
    assert no_outbound == [], f"a connection was attempted to {no_outbound}"
    assert not (root / "store" / name).exists() and counts(root)["receipts"] == before["receipts"]
    if uri.startswith("file:"):
        record("input", "SSRF: adapter URIs to private / link-local addresses",
               "registered on chain: 169.254.169.254 (metadata), 10.0.0.7, [fd00::1], [::ffff:169.254.169.254], "
               "unresolvable host, file:///etc/passwd",
               "404 adapter_unavailable; zero outbound connection attempts (socket guard); nothing stored or booked")


def _safetensors(tensors: dict[str, tuple[str, list[int], bytes]], declared_only: bool = False) -> bytes:
    header, off, blob = {}, 0, b""
    for name, (dtype, shape, data) in tensors.items():
        size = len(data)
        if declared_only:  # declares the full size while the file holds only `data`
            size = 4
            for d in shape:
                size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + size]}
        off += size
        blob += data
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def _archive(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


CONFIG = json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA", "target_modules": ["q_proj", "v_proj"],
                     "base_model_name_or_path": "x"}).encode()
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _f32(n):
    return b"\0\0\x80\x3f" * n


HOSTILE_ARCHIVES = {
    "wrong shapes": {"adapter_config.json": CONFIG, "adapter_model.safetensors": _safetensors(
        {KEY_A: ("F32", [4, 7], _f32(28)), KEY_B: ("F32", [5, 4], _f32(20))})},
    "huge declared tensor": {"adapter_config.json": CONFIG, "adapter_model.safetensors": _safetensors(
        {KEY_A: ("F32", [4, 1 << 28], _f32(16)), KEY_B: ("F32", [64, 4], _f32(256))}, declared_only=True)},
    "pickle payload": {"adapter_config.json": CONFIG, "adapter_model.safetensors": b"\x80\x04\x95" + b"cos\nsystem\n" * 8},
    "garbage config": {"adapter_config.json": b"{not json", "adapter_model.safetensors": _safetensors(
        {KEY_A: ("F32", [4, 64], _f32(256)), KEY_B: ("F32", [64, 4], _f32(256))})},
}


@pytest.mark.parametrize("what", [*HOSTILE_ARCHIVES, "bad hash"])
def test_hostile_adapter_archives_are_refused_and_the_node_keeps_serving(hostile_node, chain, tmp_path, what, no_outbound):
    server, root = hostile_node
    files = HOSTILE_ARCHIVES.get(what, HOSTILE_ARCHIVES["garbage config"])
    data = _archive(files)
    path = tmp_path / "a.tar.gz"
    path.write_bytes(data)
    sha = hashlib.sha256(b"another archive" if what == "bad hash" else data).digest()
    name = "hostile-" + hashlib.sha256(what.encode()).hexdigest()[:8]
    _register(chain, chain.anvil.funded_key(), name, path.as_uri(), sha)
    key = chain.payer(deposit=10**9)
    hdr = voucher(chain, key, 10**9)
    before = counts(root)
    r = httpx.post(server.url + CHAT, json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                   headers=hdr, timeout=120)
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    assert counts(root) == {**before, "payer_vouchers": counts(root)["payer_vouchers"]}
    ok = httpx.post(server.url + CHAT, json={"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 2}, headers=hdr, timeout=120)
    assert ok.status_code == 200
    if what == "bad hash":
        record("input", "hostile adapter archives",
               "registered on chain: wrong tensor shapes, a tensor declaring 4 GiB in a 64-byte file, a pickle "
               "posing as safetensors, unparsable config, content not matching the registered sha256",
               "each refused with a 4xx before serving (no 5xx, no OOM); nothing booked; the node keeps serving")


def test_forged_replayed_lowered_vouchers_and_forged_keys_are_refused(hostile_node, chain):
    server, root = hostile_node
    key = chain.payer(deposit=10**9)
    other = chain.payer(deposit=10**9)
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        first = c.post(CHAT, json=body, headers=voucher(chain, key, 10**6))
        assert first.status_code == 200
        # plain answers are booked just after the body is sent: fetching the receipt waits for that
        assert c.get(f"/v1/receipts/{first.json()['receipt_id']}").status_code == 200
        before = counts(root)
        payer = Account.from_key(key).address
        dom = Domain(chain.chain_id, chain.settlement.address)
        forged = sign_voucher(dom, other, chain.node_id, 10**9)
        doc = forged.to_json()
        doc["voucher"]["payer"] = payer  # someone else's signature over a voucher naming this payer
        import base64
        cases = {
            "signed by another key": {VOUCHER_HEADER: base64.b64encode(json.dumps(doc).encode()).decode()},
            "lower than the accepted": voucher(chain, key, 10**5),
            "another node id": {VOUCHER_HEADER: encode_voucher_header(sign_voucher(dom, key, chain.node_id + 7, 10**9))},
            "another contract": {VOUCHER_HEADER: encode_voucher_header(sign_voucher(
                Domain(chain.chain_id, "0x" + "11" * 20), key, chain.node_id, 10**9))},
            "bit-flipped signature": {VOUCHER_HEADER: encode_voucher_header(type(forged)(
                sign_voucher(dom, key, chain.node_id, 10**9).voucher, "0x" + "ab" * 65))},
            "forged API key": {"Authorization": "Bearer olk_" + "A" * 43},
            "API key of another scheme": {"Authorization": "Basic b2s6b2s="},
            "bearer with only the key prefix": {"Authorization": "Bearer olk_"},
        }
        statuses = {}
        for what, h in cases.items():
            r = c.post(CHAT, json=body, headers=h)
            statuses[what] = r.status_code
            assert r.status_code in (401, 402), (what, r.status_code, r.text)
        # a replay of the exact accepted voucher header pays only while it still covers billed + this request
        replay = voucher(chain, key, 10**6)
        again = c.post(CHAT, json=body, headers=replay)
        assert again.status_code == 200
        assert c.get(f"/v1/receipts/{again.json()['receipt_id']}").status_code == 200
        bal = c.get(f"/v1/payers/{payer}").json()
        assert bal["voucher_cumulative_value"] == str(10**6)
    after = counts(root)
    assert after["receipts"] == before["receipts"] + 1 and after["payer_vouchers"] == before["payer_vouchers"]
    record("input", "forged, replayed or lowered vouchers and API keys", "; ".join(cases),
           f"each 401/402 ({sorted(set(statuses.values()))}); stored voucher unchanged; a replayed voucher only "
           "re-authorizes within its cumulative cap (never pays twice past it)")


def test_concurrent_spends_racing_for_one_escrow_never_overdraw(hostile_node, chain):
    server, root = hostile_node
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True}
    # the maximum cost of one request is its prompt + 2 * 4 tokens; escrow for about three of them
    probe_key = chain.payer(deposit=10**9)
    r = httpx.post(server.url + CHAT, json=body, headers=voucher(chain, probe_key, 10**9), timeout=60).json()
    one_max = r["usage"]["prompt_tokens"] + 2 * 4
    deposit = one_max * 3 + one_max // 2
    key = chain.payer(deposit=deposit)
    hdr = voucher(chain, key, 10**9)

    async def race():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*(c.post(CHAT, json=body, headers=hdr) for _ in range(20)))

    rs = asyncio.run(race())
    codes = [x.status_code for x in rs]
    assert set(codes) <= {200, 402}, codes
    ok = codes.count(200)
    assert 1 <= ok <= 3
    payer = Account.from_key(key).address
    bal = httpx.get(f"{server.url}/v1/payers/{payer}", timeout=30).json()
    assert int(bal["billed"]) <= deposit and int(bal["reserved"]) == 0 and int(bal["available"]) >= 0
    record("input", "concurrent spends racing for one balance",
           f"20 simultaneous paid requests against escrow for {deposit / one_max:.1f} maximum-cost requests",
           f"{ok} served, {codes.count(402)} refused 402; billed {bal['billed']} <= escrow {deposit}; no reservation left")
