"""Read and validate PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`).

Validation runs in two stages so a bad adapter is refused as cheaply as possible and always before any
of its weights reach a cache tier:

1. `parse_adapter` checks the folder, the config and the safetensors *header* (key names, dtypes,
   shapes, byte extents, the byte cap) without reading a single tensor; then it reads the file once to
   compute the content hash and to check that every weight is finite.
2. `read_weights` (run by the cache's loader) reads the file again, checks the bytes still hash to the
   registered `content_hash` and turns the tensors into `AdapterWeights` in the pool dtype.

Content hash (`content_hash`): sha256 over
    b"openlora-adapter-v1\\n" + len(config) as 8-byte big-endian + canonical config + safetensors bytes
where the canonical config is `json.dumps(config, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)` encoded as UTF-8. The length prefix keeps the two parts unambiguous.

Scaling follows PEFT: scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora` (Kalajdzievski
2023, rsLoRA). `rank_pattern` / `alpha_pattern` give a module its own r / alpha, matched with PEFT's rule
(`re.match(rf"(.*\\.)?({key})$", module_name)`, first key wins). Because a slot carries one scale, a
module whose scale differs from the adapter's default has the ratio folded into its B on load, so
scale[slot] * B @ A is exactly the module's delta.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


@dataclass(frozen=True)
class ParsedAdapter:
    spec: AdapterSpec
    entries: tuple[LoraEntry, ...]
    weights_path: Path


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

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values())


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


def _read_header(path: Path, file_size: int, max_bytes: int) -> dict:
    """Parse the safetensors header (8-byte little-endian length + JSON) and check every extent."""
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
    return header


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
    header = _read_header(weights_path, file_size, max_adapter_bytes)

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
        entries.append(LoraEntry(module, layer, r, lora_scale(alpha, r, use_rslora), keys["A"], keys["B"]))
        nbytes += (r * fan_in + fan_out * r) * elt

    # the hash needs every byte, and reading them once lets us refuse NaN/inf now instead of in the loader
    data = weights_path.read_bytes()
    if len(data) != file_size:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} changed while it was being read")
    digest = content_hash(config, data)
    _tensors_from_bytes(name, data, entries)  # raises on non-finite values

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
    return ParsedAdapter(spec=spec, entries=tuple(entries), weights_path=weights_path)


def _base_id(name: str) -> str:
    # "org/model", a local path ending in the model folder, or a bare name compare by their last part
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _tensors_from_bytes(name: str, data: bytes, entries: tuple[LoraEntry, ...] | list[LoraEntry]) -> dict:
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as e:  # the safetensors parser's own errors have no common base class
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} cannot be parsed ({e})") from None
    for e in entries:
        for key in (e.a_key, e.b_key):
            if not torch.isfinite(tensors[key]).all():
                raise AdapterError(f"adapter {name!r}: tensor {key!r} contains NaN or inf")
    return tensors


def read_weights(parsed: ParsedAdapter, dtype: torch.dtype, pin_memory: bool = False) -> AdapterWeights:
    """Load a validated adapter into host memory; refuse it if the file changed since registration."""
    spec = parsed.spec
    try:
        data = parsed.weights_path.read_bytes()
        config = _read_config(parsed.weights_path.parent)
    except OSError as e:
        raise AdapterError(f"adapter {spec.name!r}: cannot read {parsed.weights_path} ({e})") from None
    if content_hash(config, data) != spec.content_hash:
        raise AdapterError(f"adapter {spec.name!r} changed on disk since it was registered; register it again")
    raw = _tensors_from_bytes(spec.name, data, parsed.entries)
    tensors = {}
    for e in parsed.entries:
        a = raw[e.a_key].to(torch.float32)
        b = raw[e.b_key].to(torch.float32)
        if e.scale != spec.scale:
            b = b * (e.scale / spec.scale)
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        if pin_memory:
            a, b = a.pin_memory(), b.pin_memory()
        tensors[(e.module, e.layer)] = (a, b)
    return AdapterWeights(content_hash=spec.content_hash, rank=spec.rank, scale=spec.scale, tensors=tensors)
