"""Checkpoint loading: single file, shards, and clear failures for broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import ModelFormatError
from engine.loader import load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_the_same_weights(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "sharded")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / fname)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(tiny_llama_dir), load_model(d)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    q = tensors["model.layers.1.self_attn.k_proj.weight"]
    qkv = b.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(qkv[64:96], q)  # k rows follow q's 64 rows in the fused projection


def test_missing_tensor_is_named(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "missing")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelFormatError, match="up_proj"):
        load_model(d)


def test_wrong_shape_is_refused(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "shape")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelFormatError, match="o_proj.*shape"):
        load_model(d)


def test_truncated_file_and_missing_shard(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="unreadable safetensors"):
        load_model(d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(ModelFormatError, match="missing: gone.safetensors"):
        load_model(d)


def test_pytorch_bin_only_is_refused(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_model(tmp_path)
