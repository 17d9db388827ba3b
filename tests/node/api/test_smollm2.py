"""One request on the real SmolLM2 default model: the served chat answer is the greedy answer that
transformers gives for the same conversation (chat template, tokenization and detokenization included)."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.slow


def test_served_smollm2_chat_matches_transformers_greedy(serve_node, node_settings, smollm2_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    del model

    (tmp_path / "adapters").mkdir()
    settings = node_settings(model=str(smollm2_dir), adapter_dir=tmp_path / "adapters")
    with serve_node(settings) as served:
        client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        resp = client.chat.completions.create(model=served.node.model_id, messages=messages, max_tokens=8,
                                              temperature=0)
    assert resp.usage.prompt_tokens == ids["input_ids"].shape[1]
    assert resp.choices[0].message.content == expected
    assert "Paris" in expected  # the real model, not noise
