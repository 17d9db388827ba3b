"""Shared fixtures: a tiny random Llama (seconds on CPU) and the real SmolLM2 default model.

The tiny model reuses SmolLM2's tokenizer files so chat templates and detokenization are real, with
a small random network behind them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. The variable must be set before anything
# (transformers, our kernels) imports triton, hence here, at the top of the root conftest.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from node import models
from node.config import DEFAULT_MODEL, load_settings


def _cache_models_dir() -> Path:
    return load_settings().models_dir


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real default model, pulled into the user cache once and reused between runs."""
    return models.pull(DEFAULT_MODEL, _cache_models_dir())


def make_tiny_llama(out: Path, tokenizer_src: Path, *, seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised Llama-family HF directory (safetensors) to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    # random (never zero) weights with a scale that gives non-degenerate logits
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture
def node_engine_config(tiny_llama_dir, monkeypatch):
    """settings -> the EngineConfig the node's EngineBridge.build hands the engine (stopped before any model
    loads): for checking that a node setting reaches the engine."""
    from engine import llm_engine
    from node.serving import EngineBridge

    class Built(Exception):
        pass

    def capture(model_dir, config):
        raise Built(config)

    monkeypatch.setattr(llm_engine, "LLMEngine", capture)

    def build(settings):
        with pytest.raises(Built) as info:
            EngineBridge.build(settings, tiny_llama_dir, "tiny", None)
        return info.value.args[0]

    return build
