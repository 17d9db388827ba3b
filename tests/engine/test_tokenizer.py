"""Tokenizer, chat template and incremental detokenizer on SmolLM2's real tokenizer files."""

from __future__ import annotations

import json

import pytest

from engine.errors import ModelFormatError, RequestError
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 🎉🧑‍🚀 mixed ascii", "  leading spaces\nand\ttabs",
         "<|im_start|>special<|im_end|> tokens"]


@pytest.fixture(scope="module")
def tok(smollm2_dir) -> Tokenizer:
    return Tokenizer(smollm2_dir)


def test_special_and_eos_tokens_come_from_the_model_files(tok):
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in tok.eos_token_ids
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [tok.bos_token_id]
    assert tok.bos_token_id in tok.special_ids


def test_chat_template_renders_the_shipped_jinja_exactly_like_transformers(tok, smollm2_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    for messages in (conv, conv[1:2]):
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert tok.encode_chat(messages, gen) == hf(ours, add_special_tokens=False)["input_ids"]


def test_chat_template_refuses_malformed_messages(tok):
    with pytest.raises(RequestError):
        tok.apply_chat_template([{"content": "no role"}])


def test_model_without_template_refuses_chat(tmp_path, smollm2_dir):
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RequestError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_is_a_model_format_error(tmp_path):
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_detokenization_equals_full_decode(tok, text, skip_special):
    prompt = tok.encode("Prompt: ")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special)
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special)
    # no delta ever carries half a character
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_split_over_tokens_is_held_back_until_complete(tok):
    ids = tok.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji's 4 bytes
    detok = IncrementalDetokenizer(tok, [])
    partial = [detok.add([i]) for i in ids[:-1]]
    assert partial == [""] * (len(ids) - 1)
    assert detok.add([ids[-1]]) == "🎉"
