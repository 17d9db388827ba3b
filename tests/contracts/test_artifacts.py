"""The committed artifacts match the Solidity sources, load, and carry every custom error; every
external/public function in the sources has NatSpec."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from node.chain.artifacts import ARTIFACT_DIR, CONTRACTS, REPO_ROOT, error_table, load_artifact, source_hash

SRC = REPO_ROOT / "contracts" / "src"


def test_artifacts_are_up_to_date_with_the_sources():
    want = source_hash()
    stale = [name for name in CONTRACTS if load_artifact(name).source_hash != want]
    assert not stale, f"artifacts out of date for {stale}: run `make -C contracts build` and commit node/chain/artifacts"


@pytest.mark.parametrize("name", CONTRACTS)
def test_artifact_loads(name):
    art = load_artifact(name)
    assert art.bytecode.startswith("0x6") and len(art.bytecode) > 200
    assert any(e["type"] == "function" for e in art.abi)
    assert art.compiler["version"].startswith("0.8.30")
    data = json.loads((ARTIFACT_DIR / f"{name}.json").read_text())
    assert data["contractName"] == name


def test_every_custom_error_in_the_sources_is_decodable():
    declared = set()
    for f in SRC.glob("*.sol"):
        declared |= set(re.findall(r"^\s*error\s+(\w+)\s*\(", f.read_text(), re.M))
    assert declared <= {spec.name for spec in error_table().values()}


def _functions_without_natspec(text: str) -> list[str]:
    missing = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*function\s+(\w+)\s*\(", line)
        if not m:
            continue
        header = " ".join(lines[i:i + 12])
        header = header[: header.find("{")] if "{" in header else header
        if not re.search(r"\b(external|public)\b", header):
            continue
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("// "):  # plain comments (e.g. lint pragmas)
            j -= 1
        if not lines[j].strip().startswith("///"):
            missing.append(m.group(1))
    return missing


@pytest.mark.parametrize("path", sorted(SRC.glob("*.sol")), ids=lambda p: p.name)
def test_every_external_function_has_natspec(path: Path):
    assert _functions_without_natspec(path.read_text()) == []
