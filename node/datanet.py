"""Datanets: the JSONL files contributors put examples into, and their canonical content hash.

Format: UTF-8, one JSON object per line (blank lines are ignored). Each object has

    contributor  0x + 40 hex digits; all-lowercase, all-uppercase or EIP-55 checksummed (a mixed-case
                 address whose checksum is wrong is refused: it is most likely a typo)
    prompt, response   a chat turn (the adapter learns to answer `prompt` with `response`), or
    text               a plain passage (learned as a whole)
    id           optional; a string or integer unique within the file

Any other field is refused, so a misspelt `respone` is an error rather than an example silently
trained without its answer. Every error names the line number and the field.

Content hash (`content_hash`, the `bytes32` registered in DatanetRegistry): sha256 over

    b"openlora-datanet-v1\\n" + for each example in file order: canonical JSON + b"\\n"

where the canonical JSON of an example has the fields above only (contributor lowercased, `id` omitted
when absent), `sort_keys=True, separators=(",", ":"), ensure_ascii=False`, UTF-8. Whitespace, key order
and address case in the file therefore do not change the hash; content and order do.

Pure Python: the node validates and hashes a Datanet without loading torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from eth_utils import to_checksum_address

from node.errors import NodeError

HASH_DOMAIN = b"openlora-datanet-v1\n"
MAX_FILE_BYTES = 64 << 20  # a Datanet is training data for a small adapter, not a corpus
MAX_FIELD_CHARS = 32_768
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
_FIELDS = ("contributor", "prompt", "response", "text", "id")


class DatanetError(NodeError):
    """A Datanet file is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line number in the file, for messages
    contributor: str  # EIP-55 checksummed
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    id: str | int | None = None

    @property
    def is_chat(self) -> bool:
        return self.prompt is not None

    def canonical(self) -> dict:
        out: dict = {"contributor": self.contributor.lower()}
        if self.is_chat:
            out["prompt"], out["response"] = self.prompt, self.response
        else:
            out["text"] = self.text
        if self.id is not None:
            out["id"] = self.id
        return out


@dataclass(frozen=True)
class Datanet:
    examples: tuple[Example, ...]
    content_hash: str  # 0x + 64 hex digits
    source: str = "<datanet>"

    @property
    def contributors(self) -> list[str]:
        """Distinct contributors (checksummed) in order of first appearance."""
        return list(dict.fromkeys(e.contributor for e in self.examples))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.examples:
            out[e.contributor] = out.get(e.contributor, 0) + 1
        return out


def canonical_line(example: Example) -> bytes:
    return json.dumps(example.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_hash(examples: list[Example] | tuple[Example, ...]) -> str:
    h = hashlib.sha256(HASH_DOMAIN)
    for e in examples:
        h.update(canonical_line(e))
        h.update(b"\n")
    return "0x" + h.hexdigest()


def normalize_address(value: object, where: str) -> str:
    """A contributor address in EIP-55 form, or DatanetError saying what is wrong with it."""
    if not isinstance(value, str):
        raise DatanetError(f"{where}: field 'contributor' must be a string 0x address, got {_kind(value)}")
    if not _ADDRESS_RE.match(value):
        raise DatanetError(f"{where}: field 'contributor' is not an address (0x followed by 40 hex digits): "
                           f"{_short(value)!r}")
    digits = value[2:]
    checksummed = to_checksum_address(value.lower())
    if digits != digits.lower() and digits != digits.upper() and value != checksummed:
        raise DatanetError(f"{where}: field 'contributor' {value} has a bad EIP-55 checksum "
                           f"(expected {checksummed}, or write it all lowercase)")
    return checksummed


def parse_line(raw: str, lineno: int, source: str = "<datanet>") -> Example:
    where = f"{source}:{lineno}"
    try:
        obj = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise DatanetError(f"{where}: field {exc.args[0]!r} appears twice") from None
    except ValueError as exc:
        raise DatanetError(f"{where}: not valid JSON ({exc.msg} at column {getattr(exc, 'colno', '?')})") from None
    if not isinstance(obj, dict):
        raise DatanetError(f"{where}: each line must be a JSON object, got {_kind(obj)}")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise DatanetError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"allowed: {', '.join(_FIELDS)}")
    if "contributor" not in obj:
        raise DatanetError(f"{where}: missing field 'contributor'")
    contributor = normalize_address(obj["contributor"], where)

    has_chat = "prompt" in obj or "response" in obj
    if has_chat and "text" in obj:
        raise DatanetError(f"{where}: give either 'prompt' + 'response' or 'text', not both")
    if has_chat:
        for name in ("prompt", "response"):
            if name not in obj:
                raise DatanetError(f"{where}: missing field {name!r} (a chat example needs prompt and response)")
        prompt, response = _text_field(obj, "prompt", where), _text_field(obj, "response", where)
        text = None
    elif "text" in obj:
        prompt = response = None
        text = _text_field(obj, "text", where)
    else:
        raise DatanetError(f"{where}: missing field 'prompt' + 'response' or 'text'")

    ex_id = obj.get("id")
    if ex_id is not None and (isinstance(ex_id, bool) or not isinstance(ex_id, (str, int))):
        raise DatanetError(f"{where}: field 'id' must be a string or an integer, got {_kind(ex_id)}")
    if isinstance(ex_id, str) and not ex_id.strip():
        raise DatanetError(f"{where}: field 'id' is empty")
    return Example(lineno, contributor, prompt, response, text, ex_id)


def iter_lines(data: str) -> Iterator[tuple[int, str]]:
    # splitlines() would also split on U+2028 and friends, which JSON allows inside strings
    for i, raw in enumerate(data.split("\n"), start=1):
        raw = raw.rstrip("\r")
        if raw.strip():
            yield i, raw


def parse_datanet(data: str, source: str = "<datanet>") -> Datanet:
    examples: list[Example] = []
    seen_ids: dict[str | int, int] = {}
    for lineno, raw in iter_lines(data):
        ex = parse_line(raw, lineno, source)
        if ex.id is not None:
            if ex.id in seen_ids:
                raise DatanetError(f"{source}:{lineno}: field 'id' {ex.id!r} repeats the id of line {seen_ids[ex.id]}")
            seen_ids[ex.id] = lineno
        examples.append(ex)
    if not examples:
        raise DatanetError(f"{source}: the Datanet is empty (no JSON lines)")
    return Datanet(tuple(examples), content_hash(examples), source)


def load_datanet(path: str | Path) -> Datanet:
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DatanetError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatanetError(f"{path}: cannot read ({exc.strerror})") from None
    if not path.is_file():
        raise DatanetError(f"{path}: not a regular file")
    if size > MAX_FILE_BYTES:
        raise DatanetError(f"{path}: {size} bytes is over the {MAX_FILE_BYTES >> 20} MiB limit of a Datanet")
    raw = path.read_bytes()
    try:
        data = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw[:exc.start].count(b"\n") + 1
        raise DatanetError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start})") from None
    return parse_datanet(data.removeprefix("\ufeff"), str(path))


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; two answers on one line is an error, not a choice
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _text_field(obj: dict, name: str, where: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise DatanetError(f"{where}: field {name!r} must be a string, got {_kind(value)}")
    if not value.strip():
        raise DatanetError(f"{where}: field {name!r} is empty")
    if len(value) > MAX_FIELD_CHARS:
        raise DatanetError(f"{where}: field {name!r} has {len(value)} characters (limit {MAX_FIELD_CHARS})")
    return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _short(value: str, n: int = 50) -> str:
    return value if len(value) <= n else value[:n] + "..."
