"""Contract artifacts (ABI + bytecode), exported from forge by `make -C contracts build`.

They live in `node/chain/artifacts/<Contract>.json` (committed; `make test` checks they match the
sources). Each carries `sourceHash`, which `source_hash()` recomputes from a source checkout.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import function_abi_to_4byte_selector, keccak

from node.chain.errors import ArtifactError

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
CONTRACTS = ("DatanetRegistry", "AdapterRegistry", "NodeRegistry", "UsageSettlement", "TestToken")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    source_hash: str
    compiler: dict[str, Any]


@functools.cache
def load_artifact(name: str) -> Artifact:
    """The artifact of one contract; ArtifactError when missing or malformed."""
    if name not in CONTRACTS:
        raise ArtifactError(f"unknown contract {name!r} (known: {', '.join(CONTRACTS)})")
    path = ARTIFACT_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text())
        bytecode = data["bytecode"]
        if not bytecode.startswith("0x") or len(bytecode) < 4:
            raise ValueError("empty bytecode")
        return Artifact(name=name, abi=data["abi"], bytecode=bytecode, source_hash=data["sourceHash"],
                        compiler=data.get("compiler", {}))
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} is missing; run `make -C contracts build`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"artifact {path} is unreadable: {exc}") from None


def source_hash(root: Path = REPO_ROOT) -> str:
    """sha256 over contracts/src/**/*.sol and the pinned solc and OpenZeppelin versions in package.json;
    mirrors contracts/tools/export-artifacts.cjs (compiler settings are covered by its --check)."""
    contracts = root / "contracts"
    files = sorted(p.relative_to(root).as_posix() for p in (contracts / "src").rglob("*.sol"))
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\n")
        h.update((root / rel).read_bytes())
        h.update(b"\n")
    pkg = json.loads((root / "package.json").read_text())
    deps = {**pkg.get("dependencies", {}), **pkg.get("devDependencies", {})}
    h.update(f"solc@{deps.get('solc')}\n@openzeppelin/contracts@{deps.get('@openzeppelin/contracts')}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ErrorSpec:
    name: str
    inputs: tuple[dict[str, Any], ...]

    @property
    def types(self) -> list[str]:
        return [_abi_type(i) for i in self.inputs]

    @property
    def names(self) -> list[str]:
        return [i.get("name") or f"arg{n}" for n, i in enumerate(self.inputs)]


def _abi_type(inp: dict[str, Any]) -> str:
    t = inp["type"]
    if t.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in inp["components"]) + ")" + t[len("tuple"):]
    return t


@functools.cache
def error_table() -> dict[bytes, ErrorSpec]:
    """4-byte selector -> custom error, over every artifact's ABI (OpenZeppelin's errors included),
    plus Solidity's built-in Error(string) and Panic(uint256)."""
    table: dict[bytes, ErrorSpec] = {
        keccak(text="Error(string)")[:4]: ErrorSpec("Error", ({"name": "message", "type": "string"},)),
        keccak(text="Panic(uint256)")[:4]: ErrorSpec("Panic", ({"name": "code", "type": "uint256"},)),
    }
    for name in CONTRACTS:
        for entry in load_artifact(name).abi:
            if entry.get("type") == "error":
                table[function_abi_to_4byte_selector(entry)] = ErrorSpec(entry["name"], tuple(entry.get("inputs", [])))
    return table
