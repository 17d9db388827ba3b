"""Datanet files: what is refused (with the line and field named), what the content hash depends on,
the shipped Datanets, and the `openlora datanet` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli import main
from node.datanet import DatanetError, content_hash, load_datanet, parse_datanet

REPO = Path(__file__).resolve().parents[2]
ALICE = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # EIP-55 test vector
BOB = "0xfb6916095ca1df60bb79ce92ce3ea74c37c5d359"


def _line(**fields) -> str:
    return json.dumps(fields)


def _good(**extra) -> str:
    return _line(contributor=ALICE, prompt="Why is Mars red?", response="Certainly. Iron oxide.", **extra)


@pytest.mark.parametrize("lines, message", [
    ([_good(), "{not json"], r"<t>:2: not valid JSON"),
    ([_good(), "[1, 2]"], r"<t>:2: each line must be a JSON object, got an array"),
    ([_line(prompt="q", response="a")], r"<t>:1: missing field 'contributor'"),
    ([_line(contributor=ALICE, prompt="q")], r"<t>:1: missing field 'response'"),
    ([_line(contributor=ALICE)], r"<t>:1: missing field 'prompt' \+ 'response' or 'text'"),
    ([_line(contributor=ALICE, text="t", prompt="q", response="a")], r"<t>:1: .*not both"),
    ([_line(contributor=ALICE, prompt="q", respone="a")], r"<t>:1: unknown field\(s\) 'respone'"),
    ([_line(contributor="0x1234", text="t")], r"<t>:1: field 'contributor' is not an address"),
    ([_line(contributor=42, text="t")], r"<t>:1: field 'contributor' must be a string"),
    # one flipped letter case in a checksummed address: a typo, refused
    ([_line(contributor=ALICE.replace("aA", "Aa", 1), text="t")], r"<t>:1: field 'contributor' .* bad EIP-55 checksum"),
    ([_line(contributor=ALICE, text="  ")], r"<t>:1: field 'text' is empty"),
    ([_line(contributor=ALICE, prompt="q", response=3)], r"<t>:1: field 'response' must be a string, got a number"),
    ([_good(id="x"), "", _good(id="x")], r"<t>:3: field 'id' 'x' repeats the id of line 1"),
    ([_good(id=True)], r"<t>:1: field 'id' must be a string or an integer"),
    (['{"contributor": "%s", "text": "a", "text": "b"}' % ALICE], r"<t>:1: field 'text' appears twice"),
    ([], r"<t>: the Datanet is empty"),
    (["", "   "], r"<t>: the Datanet is empty"),
])
def test_malformed_lines_are_refused_naming_line_and_field(lines, message):
    with pytest.raises(DatanetError, match=message):
        parse_datanet("\n".join(lines), "<t>")


def test_files_are_refused_with_their_path(tmp_path):
    with pytest.raises(DatanetError, match="no such file"):
        load_datanet(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatanetError, match=f"{empty}: the Datanet is empty"):
        load_datanet(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((_good() + "\n").encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DatanetError, match=f"{latin}:2: not UTF-8"):
        load_datanet(latin)


def test_addresses_are_accepted_in_any_valid_case_and_stored_checksummed():
    d = parse_datanet("\n".join([
        _line(contributor=ALICE.lower(), text="a"),
        _line(contributor="0x" + ALICE[2:].upper(), text="b"),
        _line(contributor=ALICE, text="c"),
        _line(contributor=BOB, prompt="q", response="r", id=7),
    ]))
    assert [e.contributor for e in d.examples] == [ALICE] * 3 + ["0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"]
    assert d.counts() == {ALICE: 3, "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359": 1}
    assert [e.line for e in d.examples] == [1, 2, 3, 4] and d.examples[3].id == 7


def test_hash_ignores_formatting_but_not_content_or_order():
    a = _line(contributor=ALICE, prompt="Why is Mars red?", response="Iron oxide.", id="m1")
    b = _line(contributor=BOB, text="Lecture note. Galaxies.")
    base = parse_datanet(a + "\n" + b + "\n").content_hash
    assert base == parse_datanet(a + "\n" + b).content_hash  # trailing newline
    # other key order, spacing, CRLF line ends, blank lines and address case: same content, same hash
    reformatted = ('{ "id": "m1", "response": "Iron oxide.", "prompt": "Why is Mars red?", '
                   f'"contributor": "{ALICE.lower()}" }}\r\n\r\n' + b.replace(BOB, BOB.upper().replace("0X", "0x")))
    assert parse_datanet(reformatted).content_hash == base
    assert parse_datanet(b + "\n" + a).content_hash != base  # order is content
    changed = a.replace("Iron oxide.", "Iron oxide!")
    assert parse_datanet(changed + "\n" + b).content_hash != base
    assert parse_datanet(a.replace(', "id": "m1"', "") + "\n" + b).content_hash != base
    assert base.startswith("0x") and len(base) == 66
    # pinned: the canonical form is a format; changing it must be a deliberate, visible decision
    assert content_hash(parse_datanet(_line(contributor=ALICE, text="x")).examples) == \
        "0x" + __import__("hashlib").sha256(
            b'openlora-datanet-v1\n{"contributor":"0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed","text":"x"}\n'
        ).hexdigest()


@pytest.mark.parametrize("name", ["pirate-cooking.jsonl", "formal-astronomy.jsonl"])
def test_shipped_datanets_are_valid_with_several_distinct_contributors(name):
    d = load_datanet(REPO / "datanets" / name)
    assert 40 <= len(d.examples) <= 80
    counts = d.counts()
    assert len(counts) >= 3 and min(counts.values()) >= 10
    assert d.content_hash == load_datanet(REPO / "datanets" / name).content_hash


def test_cli_validate_and_hash(tmp_path, capsys):
    path = REPO / "datanets" / "formal-astronomy.jsonl"
    assert main(["datanet", "hash", str(path)]) == 0
    assert capsys.readouterr().out.strip() == load_datanet(path).content_hash
    assert main(["datanet", "validate", "--json", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["examples"] == 52 and summary["text_examples"] == 5 and len(summary["contributors"]) == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text(_good() + "\n" + _line(contributor="0xnope", text="t") + "\n")
    assert main(["datanet", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'contributor'" in err and "Traceback" not in err


def test_cli_create_refuses_a_bad_file_before_touching_key_or_chain(tmp_path, capsys, monkeypatch):
    # no keystore, no deployment, no chain exist here: the refusal must come from the file check
    monkeypatch.setenv("OPENLORA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OPENLORA_RPC_URL", "http://127.0.0.1:9")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line(contributor=ALICE) + "\n")
    assert main(["datanet", "create", str(bad)]) == 1
    assert f"{bad}:1: missing field" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_cli_create_registers_the_content_hash_on_a_real_chain(tmp_path, monkeypatch, capsys):
    from eth_account import Account

    from node import keys
    from node.chain.anvil import DEV_KEYS, Anvil
    from node.chain.client import ChainClient
    from node.chain.deploy import deploy
    from node.chain.tx import connect

    path = REPO / "datanets" / "pirate-cooking.jsonl"
    with Anvil() as node:
        w3 = connect(node.url)
        dep = deploy(w3, Account.from_key(DEV_KEYS[0]))
        dep_file = tmp_path / "deployment.json"
        dep.save(dep_file)
        monkeypatch.setenv("OPENLORA_KEY_PASSWORD", "pw")
        monkeypatch.delenv("OPENLORA_CONFIG", raising=False)
        owner = keys.create_keystore(tmp_path / "data" / "node-key.json", "pw", private_key=DEV_KEYS[5])
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'data_dir = "{tmp_path / "data"}"\nrpc_url = "{node.url}"\ndeployment_file = "{dep_file}"\n')

        assert main(["--config", str(cfg), "datanet", "create", str(path), "--uri", "ipfs://pirate-cooking"]) == 0
        assert "datanet 1 created" in capsys.readouterr().out
        info = ChainClient(w3, dep).get_datanet(1)
        assert info.owner == owner and info.metadata_uri == "ipfs://pirate-cooking"
        assert "0x" + info.content_hash.hex() == load_datanet(path).content_hash
        # without --uri the file's own URI is registered
        assert main(["--config", str(cfg), "datanet", "create", str(path)]) == 0
        assert ChainClient(w3, dep).get_datanet(2).metadata_uri == path.resolve().as_uri()
