"""Import a Llama-family GGUF file into a HF-format model directory.

The embedded default model ships as a quantized GGUF file (llama.cpp's format). The engine loads
HF-format directories only, so a GGUF file is dequantized once into:

    config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json,
    generation_config.json, openlora_import.json (provenance: source file and its sha256)

Two details matter for exact parity with the original checkpoint:
- llama.cpp's converter permutes the rows of q_proj and k_proj (it interleaves the two rotary halves);
  we undo that permutation so the weights match HF's rotate-half RoPE convention.
- Quantized blocks dequantize to float32 exactly as llama.cpp would (gguf.quants), and are stored as
  float32 so no second rounding happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.errors import ModelFormatError

# GGUF tensor name (per block) -> HF parameter name suffix
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Architectures whose GGUF layout this importer understands; value = HF architecture name.
_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

# llama.cpp token types (gguf.TokenType): 3 = CONTROL, 4 = USER_DEFINED
_SPECIAL_TOKEN_TYPES = (3, 4)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` for q/k projections: rows (n_head, half, 2) -> (n_head, 2, half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _build_config(reader, arch: str) -> dict:
    p = f"{arch}."
    hidden = int(_field(reader, p + "embedding_length"))
    n_head = int(_field(reader, p + "attention.head_count"))
    n_kv = int(_field(reader, p + "attention.head_count_kv", n_head))
    head_dim = int(_field(reader, p + "attention.key_length", hidden // n_head))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, p + "vocab_size", len(tokens) if tokens is not None else 0))
    names = {t.name for t in reader.tensors}
    hf_arch, model_type = _ARCHS[arch]
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, p + "context_length", 2048)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if arch == "qwen2":
        cfg["attention_bias"] = True
    return cfg


def _build_tokenizer(reader, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json from the GGUF's BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelFormatError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's 'smollm'/'starcoder' pre-tokenizers split every digit on its own before the GPT-2 regex.
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in _SPECIAL_TOKEN_TYPES]
    tok.add_special_tokens(special)
    tok.save(str(out_dir / "tokenizer.json"))

    def name(key: str):
        idx = _field(reader, key)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length", 2048)),
        "clean_up_tokenization_spaces": False,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tcfg["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))


def import_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Dequantize `gguf_path` into a HF-format directory at `out_dir` (written atomically).

    `progress(done, total)` is called after each tensor. Returns the output directory.
    """
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:  # the gguf package raises bare ValueError/struct errors on garbage
        raise ModelFormatError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ModelFormatError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHS)})")
    cfg = _build_config(reader, arch)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        total = len(reader.tensors)
        for i, t in enumerate(reader.tensors):
            hf_name = _hf_name(t.name)
            if hf_name is None:
                raise ModelFormatError(f"unexpected tensor {t.name!r} in GGUF file")
            arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
            arr = arr.reshape(shape)
            if arch == "llama" and hf_name.endswith("q_proj.weight"):
                arr = _unpermute_rotary(arr, cfg["num_attention_heads"])
            elif arch == "llama" and hf_name.endswith("k_proj.weight"):
                arr = _unpermute_rotary(arr, cfg["num_key_value_heads"])
            tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(arr))
            if progress:
                progress(i + 1, total)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        _build_tokenizer(reader, tmp)
        (tmp / "openlora_import.json").write_text(
            json.dumps({"source": gguf_path.name, "sha256": sha256_file(gguf_path), "arch": arch}, indent=2)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{int(parts[1])}.{_BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    return None
