"""Write a PEFT LoRA adapter folder from tensors (used by the adapter factory after training).

The folder is what `peft.PeftModel.from_pretrained` and our own `parse_adapter` read back:
`adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.model.layers.{l}.{self_attn|mlp}.{module}.lora_{A|B}.weight`.
Files are written to a temporary name and renamed, so a reader never sees a half-written adapter.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from engine.adapters.peft_format import ALL_MODULES, ATTN_MODULES, CONFIG_FILE, WEIGHTS_FILE
from engine.errors import AdapterError

_PEFT_KEY_RE = re.compile(r"^base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+\.lora_[AB]\.weight$")


def peft_key(module: str, layer: int, ab: str) -> str:
    parent = "self_attn" if module in ATTN_MODULES else "mlp"
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{ab}.weight"


def save_peft_adapter(
    out_dir: str | Path,
    tensors: Mapping,
    rank: int,
    alpha: float,
    target_modules: Iterable[str],
    use_rslora: bool = False,
    base_model: str | None = None,
) -> Path:
    """Write an adapter. `tensors` maps either (module, layer) -> (A [rank, in], B [out, rank]) or full
    PEFT key strings -> tensor. Returns the folder."""
    targets = sorted(set(target_modules), key=ALL_MODULES.index) if set(target_modules) <= set(ALL_MODULES) else None
    if not targets:
        raise AdapterError(f"target_modules must be a non-empty subset of {ALL_MODULES}, got {list(target_modules)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    flat: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if isinstance(key, tuple):
            module, layer = key
            a, b = value
            flat[peft_key(module, int(layer), "A")] = a
            flat[peft_key(module, int(layer), "B")] = b
        elif isinstance(key, str) and _PEFT_KEY_RE.match(key):
            flat[key] = value
        else:
            raise AdapterError(f"tensor key {key!r} is neither (module, layer) nor a PEFT LoRA key")
    for key, t in flat.items():
        module = key.split(".")[-3]
        if module not in targets:
            raise AdapterError(f"tensor {key!r} is for {module}, which is not in target_modules {targets}")
        if t.dim() != 2 or not t.is_floating_point():
            raise AdapterError(f"tensor {key!r} must be a floating-point matrix")
        r = t.shape[0] if ".lora_A." in key else t.shape[1]
        if r != rank:
            raise AdapterError(f"tensor {key!r} has rank {r}, expected {rank}")
        if not torch.isfinite(t).all():
            raise AdapterError(f"tensor {key!r} contains NaN or inf")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "use_rslora": bool(use_rslora), "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sorted(flat.items())}, str(tmp_w),
              metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_w, out / WEIGHTS_FILE)
    os.replace(tmp_c, out / CONFIG_FILE)
    return out
