"""Parsing, validation and refusals of PEFT adapters: every bad kind refused before weights are used."""

from __future__ import annotations

import json
import math
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.adapters import AdapterCache, content_hash, parse_adapter
from engine.errors import AdapterError

from .conftest import edit_config, make_adapter, slot_delta

LIMITS = dict(max_rank=8, max_adapter_bytes=1 << 20)


def copy_adapter(adapters, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(adapters.root / name, dst)
    return dst


def rewrite_weights(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_spec_reports_rank_alpha_and_scales(adapters, model_config):
    spec = parse_adapter("all8", adapters.root / "all8", model_config, **LIMITS).spec
    assert (spec.rank, spec.alpha, spec.use_rslora) == (8, 16.0, True)
    assert spec.scale == pytest.approx(16 / math.sqrt(8))  # rsLoRA: alpha / sqrt(r)
    assert len(spec.target_modules) == 7
    plain = parse_adapter("qv4", adapters.root / "qv4", model_config, **LIMITS).spec
    assert plain.scale == 2.0 and plain.target_modules == ("q_proj", "v_proj")
    # A [4, 32] + B [32 or 16, 4] per module and layer, fp32
    assert plain.nbytes == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) * 4
    assert len(plain.content_hash) == 64


@pytest.mark.parametrize("name", ["qv4", "all8", "mlp2", "pattern", "o1"])
def test_slot_delta_equals_peft_delta(adapters, model_config, name):
    cache = AdapterCache(model_config, num_slots=1, max_rank=8, background=False)
    cache.register(name, adapters.root / name)
    slot = cache.request(name)
    for (module, layer), ref in adapters.refs[name].items():
        torch.testing.assert_close(slot_delta(cache.pool, slot, module, layer), ref, rtol=1e-5, atol=1e-6)
    # rank_pattern gives layer 1's q_proj rank 2: the columns past it are zero padding
    if name == "pattern":
        assert cache.pool.lora_a["q_proj"][1][slot][2:].abs().sum() == 0
        assert cache.pool.lora_b["q_proj"][1][slot][:, 2:].abs().sum() == 0


def test_content_hash_covers_config_and_weights(adapters, model_config, tmp_path):
    base = parse_adapter("qv4", adapters.root / "qv4", model_config, **LIMITS).spec.content_hash
    again = parse_adapter("other-name", adapters.root / "qv4", model_config, **LIMITS).spec.content_hash
    assert base == again  # the name is not content
    cfg_changed = copy_adapter(adapters, "qv4", tmp_path)
    edit_config(cfg_changed, lora_alpha=9)
    assert parse_adapter("qv4", cfg_changed, model_config, **LIMITS).spec.content_hash != base
    w_changed = copy_adapter(adapters, "qv4", tmp_path / "w")
    rewrite_weights(w_changed, lambda t: t[next(iter(t))].mul_(2))
    assert parse_adapter("qv4", w_changed, model_config, **LIMITS).spec.content_hash != base
    # the documented recipe, recomputed from the files
    cfg = json.loads((adapters.root / "qv4" / "adapter_config.json").read_text())
    assert content_hash(cfg, (adapters.root / "qv4" / "adapter_model.safetensors").read_bytes()) == base


def test_base_model_name_mismatch_is_a_warning(adapters, model_config, tmp_path):
    folder = copy_adapter(adapters, "qv4", tmp_path)
    edit_config(folder, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    spec = parse_adapter("qv4", folder, model_config, base_model="HuggingFaceTB/SmolLM2-135M", **LIMITS).spec
    assert spec.base_model == "meta-llama/Llama-2-7b-hf" and "differs" in spec.warnings[0]
    same = parse_adapter("qv4", folder, model_config, base_model="/models/Llama-2-7b-hf", **LIMITS).spec
    assert same.warnings == ()


# each case turns a valid adapter folder into one bad kind; the error must name the problem
def _dora(f):
    edit_config(f, use_dora=True)


def _modules_to_save(f):
    edit_config(f, modules_to_save=["lm_head"])


def _bias(f):
    edit_config(f, bias="all")


def _pickle(f):
    (f / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _no_safetensors(f):
    (f / "adapter_model.safetensors").rename(f / "adapter_model.bin")


def _embedding(f):
    rewrite_weights(f, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 64)}))


def _dora_vector(f):
    rewrite_weights(f, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}))


def _wrong_shape(f):
    rewrite_weights(f, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 40)}))


def _too_many_layers(f):
    def add(t):
        t["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 32)
        t["base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 4)
    rewrite_weights(f, add)


def _rank_over_max(f):
    def grow(t):
        for k in list(t):
            if ".layers.0.self_attn.q_proj." in k:
                t[k] = torch.ones(16, 32) if "lora_A" in k else torch.ones(32, 16)
    rewrite_weights(f, grow)
    edit_config(f, rank_pattern={"layers.0.self_attn.q_proj": 16})


def _nan(f):
    rewrite_weights(f, lambda t: t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].__setitem__(
        (0, 0), float("nan")))


def _inf(f):
    rewrite_weights(f, lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].__setitem__(
        (1, 1), float("inf")))


def _int_dtype(f):
    rewrite_weights(f, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32, dtype=torch.int8)}))


def _unpaired(f):
    rewrite_weights(f, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"))


def _rank_pattern_lies(f):
    edit_config(f, rank_pattern={"q_proj": 2})


def _bad_json(f):
    (f / "adapter_config.json").write_text("{not json")


def _not_lora(f):
    edit_config(f, peft_type="IA3")


def _lm_head_target(f):
    edit_config(f, target_modules=["q_proj", "v_proj", "lm_head"])


def _header_overflow(f):
    # a header that claims more bytes than the file has: refused from the header alone
    path = f / "adapter_model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**9) + raw[8:])


def _truncated(f):
    path = f / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-16])


BAD = {
    _dora: "DoRA", _modules_to_save: "modules_to_save", _bias: "bias", _pickle: "pickle",
    _no_safetensors: "pickle", _embedding: "embedding", _dora_vector: "DoRA", _wrong_shape: "base-model mismatch",
    _too_many_layers: "layer 5", _rank_over_max: "exceeds max_rank", _nan: "NaN", _inf: "inf",
    _int_dtype: "dtype", _unpaired: "without its pair", _rank_pattern_lies: "config says", _bad_json: "JSON",
    _not_lora: "IA3", _lm_head_target: "lm_head", _header_overflow: "header length", _truncated: "file size",
}


@pytest.mark.parametrize("breaker", list(BAD), ids=[f.__name__.strip("_") for f in BAD])
def test_bad_adapter_is_refused_and_leaves_no_trace(adapters, model_config, tmp_path, breaker):
    folder = copy_adapter(adapters, "qv4", tmp_path)
    breaker(folder)
    cache = AdapterCache(model_config, num_slots=2, max_rank=8, background=False, max_adapter_bytes=1 << 20)
    cache.register("good", adapters.root / "mlp2")
    before = (cache.stats(), [row[0].name for row in cache.list()])
    with pytest.raises(AdapterError, match=BAD[breaker]):
        cache.register("bad", folder)
    assert (cache.stats(), [row[0].name for row in cache.list()]) == before
    with pytest.raises(AdapterError):
        cache.request("bad")


def test_size_cap_is_checked_before_reading(adapters, model_config, tmp_path):
    size = (adapters.root / "qv4" / "adapter_model.safetensors").stat().st_size
    with pytest.raises(AdapterError, match="over the cap"):
        parse_adapter("qv4", adapters.root / "qv4", model_config, max_rank=8, max_adapter_bytes=size - 1)
    parse_adapter("qv4", adapters.root / "qv4", model_config, max_rank=8, max_adapter_bytes=size)


def test_module_outside_the_cache_target_set_is_refused(adapters, model_config):
    cache = AdapterCache(model_config, num_slots=1, max_rank=8, target_modules=("q_proj", "k_proj", "v_proj"))
    try:
        cache.register("qv4", adapters.root / "qv4")
        with pytest.raises(AdapterError, match="does not serve"):
            cache.register("mlp2", adapters.root / "mlp2")
        assert set(cache.pool.lora_a) == {"q_proj", "k_proj", "v_proj"}  # stacks only for served modules
    finally:
        cache.close()


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".", "", "x" * 129, "sp ace", "naïve"])
def test_unsafe_names_are_refused(adapters, model_config, name):
    with pytest.raises(AdapterError, match="invalid adapter name"):
        parse_adapter(name, adapters.root / "qv4", model_config, **LIMITS)


def test_mismatched_base_model_shapes_are_refused(model_config, tmp_path):
    # an adapter trained on a wider model: the shapes, not the name, decide
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=12))
    get_peft_model(wide, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "wide")
    with pytest.raises(AdapterError, match="base-model mismatch"):
        parse_adapter("wide", tmp_path / "wide", model_config, **LIMITS)


def test_rslora_with_patterns_matches_peft(model_config, tmp_path):
    from .conftest import peft_deltas

    folder, model = make_adapter(tmp_path / "rs", r=6, alpha=5, targets=("k_proj", "up_proj"), seed=9,
                                 use_rslora=True, rank_pattern={"up_proj": 3}, alpha_pattern={"k_proj": 7})
    cache = AdapterCache(model_config, num_slots=1, max_rank=8, background=False)
    cache.register("rs", folder)
    slot = cache.request("rs")
    for (module, layer), ref in peft_deltas(model).items():
        torch.testing.assert_close(slot_delta(cache.pool, slot, module, layer), ref, rtol=1e-5, atol=1e-6)
