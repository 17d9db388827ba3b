"""Real PEFT adapters on a tiny random Llama, made with peft itself (LoraConfig + get_peft_model)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.config._name_or_path = "tiny-llama"
    return model


def make_adapter(out: Path, *, r: int = 4, alpha: float = 8, targets=("q_proj", "v_proj"), seed: int = 0,
                 use_rslora: bool = False, **lora_kwargs):
    """Save a PEFT adapter with random (never zero) A and B; returns (folder, peft model)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_base(), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                   use_rslora=use_rslora, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return Path(out), model


def peft_deltas(model) -> dict[tuple[str, int], torch.Tensor]:
    """PEFT's own delta weights per (module, layer): the reference everything is checked against."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out[(parts[-1], layer)] = mod.get_delta_weight("default").detach().float()
    return out


def slot_delta(pool, slot: int, module: str, layer: int) -> torch.Tensor:
    r = int(pool.rank[slot])
    a = pool.lora_a[module][layer][slot].float()
    b = pool.lora_b[module][layer][slot].float()
    return float(pool.scale[slot]) * (b[:, :r] @ a[:r])


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def model_config():
    return SimpleNamespace(**TINY)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory):
    """A store of valid adapters of mixed ranks and targets, and PEFT's reference deltas for each."""
    root = tmp_path_factory.mktemp("adapters")
    made = {
        "qv4": dict(r=4, alpha=8, targets=("q_proj", "v_proj"), seed=1),
        "all8": dict(r=8, alpha=16, targets=ATTN + MLP, seed=2, use_rslora=True),
        "mlp2": dict(r=2, alpha=4, targets=MLP, seed=3),
        "pattern": dict(r=4, alpha=8, targets=("q_proj", "down_proj"), seed=4,
                        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3}),
        "o1": dict(r=1, alpha=2, targets=("o_proj",), seed=5),
        "qv4b": dict(r=4, alpha=4, targets=("q_proj", "v_proj"), seed=6),
    }
    refs = {}
    for name, kw in made.items():
        _, model = make_adapter(root / name, **kw)
        refs[name] = peft_deltas(model)
    return SimpleNamespace(root=root, refs=refs)
