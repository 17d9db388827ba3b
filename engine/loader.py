"""Read HF safetensors checkpoints (one file, or shards listed in model.safetensors.index.json).

The model declares, for each of its parameters, which checkpoint tensors fill it (fused q/k/v and
gate/up take several, stacked along the output rows). Loading checks every parameter is filled
exactly once with the right shape, so a truncated or mismatched checkpoint fails with one clear
message instead of producing a model with random weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.errors import ModelFormatError


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{index}: malformed shard index ({exc})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelFormatError(f"{model_dir}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{model_dir}: no *.safetensors checkpoint (pytorch .bin files are not supported)")
    return files


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ModelFormatError(f"{path}: unreadable safetensors file ({exc})") from None


def load_weights(model: torch.nn.Module, model_dir: Path, mapping: dict[str, tuple[str, int, int]],
                 optional: set[str] = frozenset(), on_filled: Callable[[str], None] | None = None) -> None:
    """Fill `model`'s parameters from the checkpoint.

    mapping: checkpoint name -> (parameter name, first output row, number of rows); a whole tensor
    has row offset 0 and rows equal to the parameter's first dimension. Checkpoint names not in the
    mapping are ignored only if listed in `optional` patterns (e.g. rotary caches some exporters save).
    on_filled(name) runs as soon as every row of a parameter is filled (quantization converts and frees
    it there, one projection at a time); the loader keeps no reference to a parameter after that.
    """
    params = dict(model.named_parameters())
    rows_of = {name: p.shape[0] for name, p in params.items()}
    filled: dict[str, int] = {name: 0 for name in params}
    seen: set[str] = set()
    for ckpt_name, tensor in iter_tensors(model_dir):
        target = mapping.get(ckpt_name)
        if target is None:
            if any(pat in ckpt_name for pat in optional):
                continue
            raise ModelFormatError(f"{model_dir}: unexpected tensor {ckpt_name!r} in checkpoint")
        if ckpt_name in seen:
            raise ModelFormatError(f"{model_dir}: tensor {ckpt_name!r} appears twice")
        seen.add(ckpt_name)
        pname, row0, rows = target
        param = params.get(pname)
        if param is None:
            raise ModelFormatError(f"{model_dir}: tensor {ckpt_name!r} fills {pname!r} past its {rows_of[pname]} rows")
        want = (rows, *param.shape[1:])
        if tuple(tensor.shape) != want:
            raise ModelFormatError(f"{model_dir}: tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                                   f"expected {want}")
        with torch.no_grad():
            param.data[row0:row0 + rows].copy_(tensor.to(param.dtype))
        filled[pname] += rows
        if on_filled is not None and filled[pname] == rows_of[pname]:
            del params[pname], param  # the callback may drop the parameter: hold no reference to it
            on_filled(pname)
    missing = sorted(n for n, rows in rows_of.items() if filled[n] != rows)
    if missing:
        absent = sorted(c for c, (p, _, _) in mapping.items() if p in missing and c not in seen)
        raise ModelFormatError(f"{model_dir}: checkpoint is missing {len(absent)} tensor(s), e.g. "
                               f"{', '.join(absent[:4])}")


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               max_positions: int | None = None, quantization: str | None = None, quant_group_size: int = 128):
    """Build the Llama-family model for `model_dir` and fill it from its checkpoint.

    quantization "q4": every LoRALinear's base weight becomes 4-bit (engine.layers.quant) as soon as the
    checkpoint has filled it, quantized on `device`, so the device never holds more than one projection
    in full precision; embeddings, lm_head and norms keep `dtype`."""
    from engine.config import ModelConfig
    from engine.layers import quant
    from engine.models.llama import LlamaForCausalLM

    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    on_filled = None
    if quantization is not None:
        quant.check_quantization(quantization, quant_group_size)
        # refuse a group size no projection can use before a weight is read
        for in_features, _ in cfg.module_shapes().values():
            quant.group_size_for(in_features, quant_group_size)
    model = LlamaForCausalLM(cfg, max_positions)
    if quantization is not None:
        on_filled = _quantizer(model, quant_group_size, device)
    # parameters only: the rotary tables stay float32, as HF keeps them
    for p in model.parameters():
        p.data = p.data.to(dtype)
    # Exporters sometimes save the tied head or rotary tables; neither carries information we lack.
    optional = {"rotary_emb.inv_freq"} | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    load_weights(model, model_dir, model.checkpoint_mapping(), optional, on_filled)
    return model.to(device).eval()


def _quantizer(model: torch.nn.Module, group_size: int, device: str) -> Callable[[str], None]:
    """on_filled for load_weights: quantize a LoRALinear's weight once the checkpoint has filled it."""
    from engine.layers.linear import LoRALinear
    from engine.layers.quant import quantize_module

    def on_filled(pname: str) -> None:
        owner, _, leaf = pname.rpartition(".")
        mod = model.get_submodule(owner)
        if leaf == "weight" and isinstance(mod, LoRALinear):
            quantize_module(mod, group_size, device)

    return on_filled
