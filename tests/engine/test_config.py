"""ModelConfig parsing: the supported family is read exactly; anything else is refused clearly."""

from __future__ import annotations

import json

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.errors import EngineConfigError, ModelFormatError

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_smollm2_config_reads_tied_embeddings_and_gqa(smollm2_dir):
    cfg = ModelConfig.from_dir(smollm2_dir)
    assert cfg.tie_word_embeddings and cfg.num_key_value_heads == 3 and cfg.head_dim == 64
    assert cfg.rope_theta == 100000.0 and not cfg.qkv_bias


def test_qwen2_has_qkv_bias_only():
    cfg = ModelConfig.from_dict({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                 "sliding_window": 4096, "use_sliding_window": False})
    assert cfg.qkv_bias and not cfg.o_bias and cfg.sliding_window is None


def test_llama3_rope_scaling_from_both_config_spellings():
    old = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
    a = ModelConfig.from_dict({**LLAMA, "rope_theta": 500000.0, "rope_scaling": old})
    b = ModelConfig.from_dict({**LLAMA, "rope_parameters": {**old, "rope_theta": 500000.0}})
    assert a.rope_scaling == b.rope_scaling and a.rope_scaling.factor == 8.0
    assert a.rope_theta == b.rope_theta == 500000.0


def test_mistral_sliding_window_caps_the_model_length():
    cfg = ModelConfig.from_dict({**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                 "sliding_window": 256, "max_position_embeddings": 4096})
    assert EngineConfig().model_len(cfg) == 256


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling"),
    ({"model_type": "qwen2"}, "model_type"),
])
def test_unsupported_or_malformed_configs_are_refused(change, message):
    with pytest.raises(ModelFormatError, match=message):
        ModelConfig.from_dict({**LLAMA, **change})


def test_missing_or_broken_config_json(tmp_path):
    with pytest.raises(ModelFormatError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="unreadable"):
        ModelConfig.from_dir(tmp_path)


def test_engine_config_validation():
    with pytest.raises(EngineConfigError):
        EngineConfig(block_size=0).validate()
    with pytest.raises(EngineConfigError, match="float32"):
        EngineConfig(dtype="bf16").torch_dtype()
    for bad in (-1.0, float("nan")):
        with pytest.raises(EngineConfigError, match="adapter_admit_wait_ms"):
            EngineConfig(adapter_admit_wait_ms=bad).validate()
    cfg = ModelConfig.from_dict(LLAMA)
    # 2 layers * (k+v) * 16 tokens * 32 kv values * 4 bytes = 8 KiB per block
    assert EngineConfig(kv_cache_bytes=80 * 1024).kv_blocks_for(cfg) == 10


def test_parity_fixtures_exercise_what_they_claim(tiny_qwen2_dir, tiny_llama3_dir):
    qwen = ModelConfig.from_dir(tiny_qwen2_dir)
    assert qwen.qkv_bias and not qwen.tie_word_embeddings
    llama3 = ModelConfig.from_dir(tiny_llama3_dir)
    assert llama3.rope_scaling.rope_type == "llama3" and llama3.rope_theta == 500000.0
