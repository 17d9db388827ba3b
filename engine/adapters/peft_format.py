"""Read and validate PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`).

Validation runs in two stages so a bad adapter is refused as cheaply as possible and always before any
of its weights reach a cache tier:

1. `parse_adapter` checks the folder, the config and the safetensors *header* (key names, dtypes,
   shapes, byte extents, the byte cap) without reading a single tensor; then it reads the file once to
   compute the content hash and to check that every weight is finite.
2. `read_weights` (run by the cache's loader) reads the file again into one buffer, checks the bytes are
   still the ones registered (see "Verification on load") and packs the tensors into one buffer in the
   pool dtype (`engine.adapters.packed`), pinned when it feeds a CUDA pool.

Content hash (`content_hash`): sha256 over
    b"openlora-adapter-v1\\n" + len(config) as 8-byte big-endian + canonical config + safetensors bytes
where the canonical config is `json.dumps(config, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)` encoded as UTF-8. The length prefix keeps the two parts unambiguous.

Verification on load: one sha256 stream runs at ~1.5-2 GB/s on one core, ~50 ms for an 8B-shape rank-16
adapter, more than the whole disk -> GPU budget, and it cannot be split across cores. So registration,
which computes `content_hash` from the file's bytes, also records a `FileDigest` of those same bytes: the
sha256 of the canonical config and of every CHUNK_BYTES piece of the safetensors file. A load reads
and hashes the chunks in parallel threads (os.preadv and hashlib release the GIL), then checks the size,
the config digest and every chunk digest before any weight is unpacked: equal digests mean the bytes
are the ones whose `content_hash` was registered. A ParsedAdapter without a FileDigest is checked
against `content_hash` in full.

Scaling follows PEFT: scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora` (Kalajdzievski
2023, rsLoRA). `rank_pattern` / `alpha_pattern` give a module its own r / alpha, matched with PEFT's rule
(`re.match(rf"(.*\\.)?({key})$", module_name)`, first key wins). Because a slot carries one scale, a
module whose scale differs from the adapter's default has the ratio folded into its B on load, so
scale[slot] * B @ A is exactly the module's delta.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.adapters.packed import ModuleBlock, PackedBuffer, PackedLayout, pack_pairs
from engine.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# pickle-based weight files: never unpickled (arbitrary code execution), so their presence is refused
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTN_MODULES + MLP_MODULES

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight$"
)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_MAX_CONFIG_BYTES = 1 << 20
CHUNK_BYTES = 2 << 20  # read + verification chunk: ~40 per 8B-shape adapter, enough to spread over cores
_MAX_HEADER_BYTES = 64 << 20
# config fields that change what the adapter computes in ways the batched LoRA path cannot reproduce;
# each must be absent, null, false or empty
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora) adapters are not supported: the magnitude vector cannot be applied "
    "in the batched LoRA path",
    "modules_to_save": "modules_to_save (fully trained copies of modules such as embeddings or lm_head) "
    "is not supported",
    "trainable_token_indices": "trainable_token_indices (embedding token training) is not supported",
    "lora_bias": "lora_bias is not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "use_bdlora is not supported",
}


def check_name(name: str) -> str:
    """Adapter names become folder names and URL parts: a safe alphabet and no '.'/'..'."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-128 characters from [A-Za-z0-9._-], not '.' or '..'"
        )
    return name


def module_shapes(model_config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection, from any object with the Llama config fields."""
    h = int(model_config.hidden_size)
    i = int(model_config.intermediate_size)
    heads = int(model_config.num_attention_heads)
    kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(model_config, "head_dim", None) or h // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


@dataclass(frozen=True)
class AdapterSpec:
    """What the engine knows about a registered adapter (or a fused mix, whose path is None)."""

    name: str
    path: Path | None
    content_hash: str
    rank: int  # the slot rank: the largest rank over the adapter's modules
    alpha: float
    use_rslora: bool
    scale: float  # the slot scale; per-module differences are folded into B on load
    target_modules: tuple[str, ...]
    nbytes: int  # bytes of the weights once in host memory (A and B, pool dtype)
    base_model: str | None
    module_ranks: tuple[tuple[str, int], ...] = ()  # (module, largest rank over layers)
    warnings: tuple[str, ...] = ()  # e.g. base_model_name_or_path differs from the served model
    file_bytes: int = 0  # size of adapter_model.safetensors on disk

    def rank_of(self, module: str) -> int:
        return dict(self.module_ranks).get(module, 0)


@dataclass(frozen=True)
class LoraEntry:
    """One (module, layer) pair of an adapter: where its A/B live in the file and its own scale."""

    module: str
    layer: int
    rank: int
    scale: float
    a_key: str
    b_key: str
    a_offset: int = -1  # byte offset of A's data from the start of the file (-1: unknown)
    b_offset: int = -1
    a_dtype: str = "F32"  # safetensors dtype names
    b_dtype: str = "F32"


@dataclass(frozen=True)
class FileDigest:
    """Digests of the bytes `content_hash` was computed from, checkable in parallel (module docstring)."""

    file_bytes: int
    config_sha256: str
    chunk_bytes: int
    chunks: tuple[str, ...]  # sha256 of each chunk_bytes piece of the safetensors file


@dataclass(frozen=True)
class ParsedAdapter:
    spec: AdapterSpec
    entries: tuple[LoraEntry, ...]
    weights_path: Path
    layout: PackedLayout | None = None  # the packed host layout of its weights (None: built on read)
    digest: FileDigest | None = None  # None: read_weights checks content_hash in full


@dataclass
class AdapterWeights:
    """An adapter's weights in memory: delta(module, layer) = scale * B @ A.

    tensors[(module, layer)] = (A [r, in_features], B [out_features, r]); modules the adapter does not
    target (or layers it skips) are absent and mean a zero delta.
    """

    content_hash: str
    rank: int
    scale: float
    tensors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]
    packed: PackedBuffer | None = None  # when set, `tensors` are views into it and slot writes use it

    @property
    def nbytes(self) -> int:
        if self.packed is not None:
            return self.packed.nbytes
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values())


@dataclass
class ReadTimings:
    """Where disk -> host time goes (cumulative ms over reads)."""

    reads: int = 0
    read_ms: float = 0.0  # config + safetensors bytes into memory, chunks hashed as they land (parallel)
    verify_ms: float = 0.0  # comparing size and digests with the registered ones
    alloc_ms: float = 0.0  # the packed buffer's (pinned) allocation
    pack_ms: float = 0.0  # copies + dtype conversion into the packed layout


def canonical_config_bytes(config: dict) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_hash(config: dict, weights_bytes: bytes) -> str:
    cfg = canonical_config_bytes(config)
    h = hashlib.sha256(b"openlora-adapter-v1\n")
    h.update(struct.pack(">Q", len(cfg)))
    h.update(cfg)
    h.update(weights_bytes)
    return h.hexdigest()


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: missing {CONFIG_FILE}")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdapterError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: must be a JSON object")
    return config


def _check_config(config: dict, where: Path) -> tuple[int, float, bool]:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{where}: peft_type {peft_type!r} is not supported (only LORA)")
    for field_name, why in _UNSUPPORTED_FIELDS.items():
        value = config.get(field_name)
        if value not in (None, False, [], {}, ""):
            raise AdapterError(f"{where}: {why} ({field_name}={value!r})")
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"{where}: bias={bias!r} is not supported (only 'none'): bias terms would change "
                           "the base model's outputs for every request")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        # zero would make the adapter a no-op and leave no slot scale to fold per-module scales into
        raise AdapterError(f"{where}: lora_alpha must be a finite non-zero number, got {alpha!r}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterError(f"{where}: use_rslora must be true or false, got {use_rslora!r}")
    for pattern_field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(pattern_field) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{where}: {pattern_field} must be an object")
        for key, value in patterns.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value != 0
            if pattern_field == "rank_pattern":
                ok = ok and isinstance(value, int) and value >= 1
            if not ok:
                raise AdapterError(f"{where}: {pattern_field}[{key!r}] = {value!r} is not valid")
            try:
                re.compile(key)
            except re.error as e:
                raise AdapterError(f"{where}: {pattern_field} key {key!r} is not a valid pattern ({e})") from None
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        for t in targets:
            if t not in ALL_MODULES:
                raise AdapterError(f"{where}: target module {t!r} is not supported (supported: "
                                   f"{', '.join(ALL_MODULES)}); embedding / lm_head LoRA cannot be served")
    return r, float(alpha), use_rslora


def _read_header(path: Path, file_size: int, max_bytes: int) -> tuple[dict, int]:
    """Parse the safetensors header (8-byte little-endian length + JSON) and check every extent.
    Returns the header and the byte offset where the data section starts."""
    if file_size < 8:
        raise AdapterError(f"{path}: not a safetensors file (too short)")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(file_size - 8, _MAX_HEADER_BYTES, max_bytes):
            raise AdapterError(f"{path}: safetensors header length {n} is out of range")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - n
    end_max = 0
    for key, info in header.items():
        if not isinstance(info, dict):
            raise AdapterError(f"{path}: tensor {key!r} has a malformed header entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES:
            raise AdapterError(f"{path}: tensor {key!r} has dtype {dtype!r}; accepted: {', '.join(_DTYPES)}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise AdapterError(f"{path}: tensor {key!r} has a malformed shape or data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise AdapterError(f"{path}: tensor {key!r} data_offsets {offsets} do not match its shape/dtype "
                               "or the file size")
        end_max = max(end_max, end)
    if end_max != data_size:
        raise AdapterError(f"{path}: file size does not match the safetensors header")
    return header, 8 + n


def _refusal_for_key(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vectors are not supported"
    if "lora_embedding" in key or "embed_tokens" in key:
        return "embedding LoRA is not supported"
    if "modules_to_save" in key or "lm_head" in key:
        return "modules_to_save / lm_head weights are not supported"
    if key.endswith(".bias"):
        return "bias weights are not supported"
    return "not a LoRA A/B weight of a supported projection"


def parse_adapter(
    name: str,
    folder: str | Path,
    model_config: Any,
    *,
    max_rank: int,
    max_adapter_bytes: int,
    target_modules: tuple[str, ...] = ALL_MODULES,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ParsedAdapter:
    """Validate an adapter folder completely; raise AdapterError naming the first problem found."""
    check_name(name)
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: {folder} is not a directory")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(f"adapter {name!r}: {folder} holds pickle-format weights ({', '.join(pickles)}); "
                           f"only {WEIGHTS_FILE} is accepted, pickles are never loaded")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"adapter {name!r}: {folder} has no {WEIGHTS_FILE}")
    config = _read_config(folder)
    r_default, alpha_default, use_rslora = _check_config(config, folder)

    # size cap from the file size, then from the header, before any tensor byte is read
    file_size = weights_path.stat().st_size
    if file_size > max_adapter_bytes:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is {file_size} bytes, over the cap of "
                           f"{max_adapter_bytes} bytes")
    header, data_start = _read_header(weights_path, file_size, max_adapter_bytes)

    shapes = module_shapes(model_config)
    num_layers = int(model_config.num_hidden_layers)
    found: dict[tuple[str, int], dict[str, str]] = {}
    for key in header:
        m = _KEY_RE.match(key)
        if not m:
            raise AdapterError(f"adapter {name!r}: tensor {key!r}: {_refusal_for_key(key)}")
        layer, parent, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        expected_parent = "self_attn" if module in ATTN_MODULES else "mlp" if module in MLP_MODULES else None
        if expected_parent is None:
            raise AdapterError(f"adapter {name!r}: tensor {key!r}: module {module!r} is not supported "
                               f"(supported: {', '.join(ALL_MODULES)})")
        if parent != expected_parent:
            raise AdapterError(f"adapter {name!r}: tensor {key!r}: {module} belongs under {expected_parent}")
        if module not in target_modules:
            raise AdapterError(f"adapter {name!r}: targets {module}, which this cache does not serve "
                               f"(configured: {', '.join(target_modules)})")
        if layer >= num_layers:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is for layer {layer} but the base model has "
                               f"{num_layers} layers (base-model mismatch)")
        found.setdefault((module, layer), {})[ab] = key
    if not found:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    scale_default = lora_scale(alpha_default, r_default, use_rslora)
    entries = []
    nbytes = 0
    elt = torch.empty((), dtype=dtype).element_size()
    for (module, layer), keys in sorted(found.items(), key=lambda kv: (kv[0][1], ALL_MODULES.index(kv[0][0]))):
        if set(keys) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has lora_{''.join(keys)} without its pair")
        a_shape, b_shape = header[keys["A"]]["shape"], header[keys["B"]]["shape"]
        fan_in, fan_out = shapes[module]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module}: A and B must be matrices")
        r = a_shape[0]
        if a_shape[1] != fan_in or b_shape[0] != fan_out or b_shape[1] != r:
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {module}: shapes A{a_shape} B{b_shape} do not fit the base "
                f"model (expected A[r, {fan_in}] and B[{fan_out}, r]): base-model mismatch")
        module_name = f"model.layers.{layer}.{'self_attn' if module in ATTN_MODULES else 'mlp'}.{module}"
        r_expected = _pattern_value(rank_pattern, module_name, r_default)
        if r != r_expected:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has rank {r} but the config says "
                               f"{r_expected}")
        if r > max_rank:
            raise AdapterError(f"adapter {name!r}: rank {r} (layer {layer} {module}) exceeds max_rank {max_rank}")
        alpha = _pattern_value(alpha_pattern, module_name, alpha_default)
        ha, hb = header[keys["A"]], header[keys["B"]]
        entries.append(LoraEntry(module, layer, r, lora_scale(alpha, r, use_rslora), keys["A"], keys["B"],
                                 data_start + ha["data_offsets"][0], data_start + hb["data_offsets"][0],
                                 ha["dtype"], hb["dtype"]))
        nbytes += (r * fan_in + fan_out * r) * elt

    # the hash needs every byte, and reading them once lets us refuse NaN/inf now instead of in the loader
    try:
        got = _read_chunks(weights_path, file_size, CHUNK_BYTES)
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: cannot read {weights_path} ({e})") from None
    if got is None:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} changed while it was being read")
    raw, chunks = got
    digest = content_hash(config, memoryview(raw.numpy()))
    file_digest = FileDigest(file_size, _sha256(canonical_config_bytes(config)), CHUNK_BYTES, chunks)
    _check_finite(name, raw, entries, shapes)
    layout = PackedLayout.build(shapes, num_layers, {(e.module, e.layer): e.rank for e in entries})

    base = config.get("base_model_name_or_path")
    warnings = []
    if base_model and base and _base_id(base) != _base_id(base_model):
        warnings.append(f"base_model_name_or_path {base!r} differs from the served model {base_model!r} "
                        "(shapes match, so it is served)")
    module_ranks: dict[str, int] = {}
    for e in entries:
        module_ranks[e.module] = max(module_ranks.get(e.module, 0), e.rank)
    targets = tuple(m for m in ALL_MODULES if m in module_ranks)
    spec = AdapterSpec(
        name=name, path=folder, content_hash=digest, rank=max(module_ranks.values()), alpha=alpha_default,
        use_rslora=use_rslora, scale=scale_default, target_modules=targets, nbytes=nbytes,
        base_model=base if isinstance(base, str) else None,
        module_ranks=tuple((m, module_ranks[m]) for m in targets), warnings=tuple(warnings),
        file_bytes=file_size,
    )
    return ParsedAdapter(spec=spec, entries=tuple(entries), weights_path=weights_path, layout=layout,
                         digest=file_digest)


def _base_id(name: str) -> str:
    # "org/model", a local path ending in the model folder, or a bare name compare by their last part
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


# --------------------------------------------------------------------------- reading the bytes

_WORKERS = max(1, min(16, os.cpu_count() or 1))
_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


def _hasher() -> ThreadPoolExecutor:
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max_workers=_WORKERS,
                                            thread_name_prefix="adapter-hash")
        return _hash_pool


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


_scratch = threading.local()  # per thread: the largest file read so far, reused (no fresh pages per read)


def _scratch_bytes(n: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = None  # drop the old one before allocating its successor
        buf = _scratch.buf = torch.empty(n, dtype=torch.uint8)
    return buf[:n]


class _Truncated(Exception):
    pass


def _read_chunks(path: Path, expected_size: int, chunk: int) -> tuple[torch.Tensor, tuple[str, ...]] | None:
    """The whole file in this thread's scratch buffer (valid until the thread's next read) and the sha256
    of each `chunk`-byte piece, read and hashed in parallel. None when the file's size is not
    `expected_size` (it changed since it was checked); a change during the read shows in the digests."""
    with path.open("rb", buffering=0) as f:
        fd = f.fileno()
        if os.fstat(fd).st_size != expected_size:
            return None
        raw = _scratch_bytes(expected_size)
        view = memoryview(raw.numpy())

        def read_and_hash(start: int) -> str:
            piece = view[start:start + chunk]
            got = 0
            while got < len(piece):
                n = os.preadv(fd, [piece[got:]], start + got)
                if not n:
                    raise _Truncated
                got += n
            return _sha256(piece)

        try:
            digests = tuple(_hasher().map(read_and_hash, range(0, expected_size, chunk) or [0]))
        except _Truncated:
            return None
        if os.fstat(fd).st_size != expected_size:
            return None
    return raw, digests


def _typed(raw: torch.Tensor, offset: int, dtype_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A [rows, cols] tensor over the file's bytes at `offset` (a view; a copy only when misaligned)."""
    dtype = _DTYPES[dtype_name]
    nbytes = shape[0] * shape[1] * _DTYPE_BYTES[dtype_name]
    piece = raw[offset:offset + nbytes]
    if offset % _DTYPE_BYTES[dtype_name]:
        piece = piece.clone()  # safetensors does not promise alignment when dtypes are mixed
    return piece.view(dtype).view(shape)


def _entry_views(raw: torch.Tensor, e: LoraEntry, shape_a: tuple[int, int],
                 shape_b: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _typed(raw, e.a_offset, e.a_dtype, shape_a), _typed(raw, e.b_offset, e.b_dtype, shape_b)


def _check_finite(name: str, raw: torch.Tensor, entries: list[LoraEntry],
                  shapes: dict[str, tuple[int, int]]) -> None:
    for e in entries:
        fan_in, fan_out = shapes[e.module]
        for key, t in zip((e.a_key, e.b_key), _entry_views(raw, e, (e.rank, fan_in), (fan_out, e.rank))):
            if not torch.isfinite(t).all():
                raise AdapterError(f"adapter {name!r}: tensor {key!r} contains NaN or inf")


def _verify(parsed: ParsedAdapter, config: dict, raw: torch.Tensor, chunks: tuple[str, ...]) -> bool:
    """Whether the bytes read are the ones registered (module docstring, "Verification on load")."""
    d = parsed.digest
    if d is None or d.chunk_bytes != CHUNK_BYTES:
        return content_hash(config, memoryview(raw.numpy())) == parsed.spec.content_hash
    return (raw.numel() == d.file_bytes and _sha256(canonical_config_bytes(config)) == d.config_sha256
            and chunks == d.chunks)


def _pack(parsed: ParsedAdapter, raw: torch.Tensor, packed: PackedBuffer) -> None:
    """Copy every A/B from the file's bytes into the packed buffer, converting to its dtype; per-module
    scales that differ from the slot scale are folded into B.

    The usual case (file already in the pool dtype, every layer at the module's rank, one scale) is pure
    address arithmetic and memcpy: no tensor object per weight, copies spread over the worker threads
    with ctypes.memmove (which releases the GIL and, unlike torch copies issued from several threads,
    starts no OpenMP teams that fight over the cores). Anything else goes through torch views and one
    batched copy call."""
    spec, layout, buf = parsed.spec, packed.layout, packed.buffer
    elt, src_base, dst_base = buf.element_size(), raw.data_ptr(), buf.data_ptr()
    blocks = {blk.module: blk for blk in layout.blocks}
    fast: list[tuple[int, int, int]] = []  # (dst address, src address, bytes)
    slow: list[tuple[LoraEntry, ModuleBlock, bool]] = []  # (entry, block, whole pair or B only)
    for e in parsed.entries:
        blk = blocks[e.module]
        same_a = _DTYPES[e.a_dtype] == buf.dtype and e.rank == blk.rank
        same_b = _DTYPES[e.b_dtype] == buf.dtype and e.rank == blk.rank and e.scale == spec.scale
        if not same_a:
            slow.append((e, blk, True))
            continue
        a_bytes, b_bytes = e.rank * blk.fan_in * elt, blk.fan_out * e.rank * elt
        fast.append((dst_base + blk.a_offset * elt + e.layer * a_bytes, src_base + e.a_offset, a_bytes))
        if same_b:
            fast.append((dst_base + blk.b_offset * elt + e.layer * b_bytes, src_base + e.b_offset, b_bytes))
        else:
            slow.append((e, blk, False))
    if fast:
        parts = max(1, min(8, _WORKERS, len(fast) // 16))
        list(_hasher().map(_memmove_all, [fast[i::parts] for i in range(parts)]))
    if slow:
        _pack_slow(spec, raw, packed, slow)


def _memmove_all(pairs: list[tuple[int, int, int]]) -> None:
    for d, s, n in pairs:
        ctypes.memmove(d, s, n)


def _pack_slow(spec: AdapterSpec, raw: torch.Tensor, packed: PackedBuffer,
               entries: list[tuple[LoraEntry, ModuleBlock, bool]]) -> None:
    """Dtype conversion, smaller-than-block ranks (rank_pattern) and per-module scales (alpha_pattern)."""
    rows = {blk.module: (packed.a(blk).unbind(0), packed.b(blk).unbind(0)) for blk in packed.layout.blocks}
    dst, src, scaled = [], [], []
    for e, blk, with_a in entries:
        a_layers, b_layers = rows[e.module]
        a_src, b_src = _entry_views(raw, e, (e.rank, blk.fan_in), (blk.fan_out, e.rank))
        a_dst, b_dst = a_layers[e.layer], b_layers[e.layer]
        if e.rank != blk.rank:
            a_dst, b_dst = a_dst[:e.rank], b_dst[:, :e.rank]
        if with_a:
            dst.append(a_dst)
            src.append(a_src)
        if e.scale != spec.scale:
            scaled.append((b_dst, b_src, e.scale / spec.scale))
        else:
            dst.append(b_dst)
            src.append(b_src)
    if dst:
        torch._foreach_copy_(dst, src)
    for b_dst, b_src, ratio in scaled:  # scale in fp32 and round once, as PEFT's merge would
        b_dst.copy_(b_src.to(torch.float32) * ratio)


def read_weights(parsed: ParsedAdapter, dtype: torch.dtype, pin_memory: bool = False,
                 timings: ReadTimings | None = None) -> AdapterWeights:
    """Load a validated adapter into host memory; refuse it if the file changed since registration.
    The weights are packed (`AdapterWeights.packed`); `tensors` are views into the packed buffer."""
    spec = parsed.spec
    t0 = time.perf_counter()
    try:
        config = _read_config(parsed.weights_path.parent)
        size = spec.file_bytes or parsed.weights_path.stat().st_size
        got = _read_chunks(parsed.weights_path, size, CHUNK_BYTES)
    except OSError as e:
        raise AdapterError(f"adapter {spec.name!r}: cannot read {parsed.weights_path} ({e})") from None
    t1 = time.perf_counter()
    if got is None or not _verify(parsed, config, *got):
        raise AdapterError(f"adapter {spec.name!r} changed on disk since it was registered; register it again")
    t2 = time.perf_counter()
    # NaN/inf were refused at registration and the bytes are the registered ones: no second scan
    layout = parsed.layout
    if layout is None:
        raise AdapterError(f"adapter {spec.name!r}: no packed layout (parse it with parse_adapter)")
    packed = PackedBuffer.allocate(layout, dtype, pin_memory)
    t3 = time.perf_counter()
    _pack(parsed, got[0], packed)
    tensors = packed.pair_views((e.module, e.layer, e.rank) for e in parsed.entries)
    if timings is not None:
        t4 = time.perf_counter()
        timings.reads += 1
        timings.read_ms += (t1 - t0) * 1e3
        timings.verify_ms += (t2 - t1) * 1e3
        timings.alloc_ms += (t3 - t2) * 1e3
        timings.pack_ms += (t4 - t3) * 1e3
    return AdapterWeights(content_hash=spec.content_hash, rank=spec.rank, scale=spec.scale, tensors=tensors,
                          packed=packed)


def pack_weights(weights: AdapterWeights, shapes: dict[str, tuple[int, int]], num_layers: int,
                 dtype: torch.dtype, pin_memory: bool = False) -> AdapterWeights:
    """The same adapter with its tensors moved into one packed (pinned) buffer, so slot writes take the
    few-copies path (fusion results, hand-built or synthetic weights)."""
    if weights.packed is not None:
        return weights
    packed = pack_pairs(weights.tensors, shapes, num_layers, dtype, pin_memory)
    ranks = [(m, layer, a.shape[0]) for (m, layer), (a, _) in weights.tensors.items()]
    return AdapterWeights(content_hash=weights.content_hash, rank=weights.rank, scale=weights.scale,
                          tensors=packed.pair_views(ranks), packed=packed)
