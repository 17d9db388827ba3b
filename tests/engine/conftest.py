"""Engine fixtures: tiny model variants (Qwen2 q/k/v bias, llama3 RoPE scaling), PEFT adapters made
by PEFT itself, and the Hugging Face reference runs they are compared against.

The tiny builder mirrors tests/conftest.py's (conftest helpers cannot be imported under
--import-mode=importlib); variants reuse SmolLM2's tokenizer files so text paths stay real.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # Engine tests run many small ops on a 2-core CI box shared with other suites: a second intra-op
    # thread buys nothing there and, under load, stalls every op on thread hand-off (5x slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def warm_adapters(engine, names) -> None:
    """Load the named adapters into their slots with a one-token run. A load runs in the background, and on a
    busy machine a sequence whose adapter is still loading is admitted a step later: tests that count steps or
    compare two engines' batches load first, so admission does not depend on the machine's speed."""
    from engine.sampling_params import SamplingParams

    names = sorted({n for n in names if n is not None})
    if names:
        engine.generate([[1, 2]] * len(names), SamplingParams(temperature=0.0, max_tokens=1), adapters=names)


def record_schedules(engine) -> list:
    """Every SchedulerOutput the engine's scheduler hands out from now on, in order."""
    outs = []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        outs.append(out)
        return out

    engine.scheduler.schedule = recording
    return outs


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

BASE_CFG = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)


def build_tiny(out: Path, tokenizer_src: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    cfg = dict(BASE_CFG, **overrides)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**cfg))
    else:
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smollm2_dir) -> Path:
    # untied head, q/k/v biases (non-zero after the random init above)
    return build_tiny(tmp_path_factory.mktemp("tiny-qwen2"), smollm2_dir, arch="qwen2", seed=1,
                      tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, smollm2_dir) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-mistral"), smollm2_dir, arch="mistral", seed=3,
                      tie_word_embeddings=False, sliding_window=None)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory, smollm2_dir) -> Path:
    # a small original context so positions of a short test prompt reach the scaled band
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    return build_tiny(tmp_path_factory.mktemp("tiny-llama3"), smollm2_dir, seed=2, rope_parameters=scaling,
                      rope_theta=500000.0)


def make_peft_adapter(base_dir: Path, out: Path, r: int, targets: list[str], alpha: float,
                      seed: int, use_rslora: bool = False, std: float = 0.1, base_model=None) -> Path:
    """A PEFT adapter written by PEFT itself, with random (never zero) A and B. Pass `base_model` (a
    loaded transformers model) to reuse it: the LoRA layers are taken out again afterwards."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = base_model or AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.save_pretrained(out)
    if base_model is not None:
        peft_model.unload()
    return out


# rank, target modules, alpha, rslora: different ranks and module subsets, mixed in one batch
ADAPTER_SPECS = {
    "a4": (4, ["q_proj", "v_proj"], 8.0, False),
    "b8": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16.0, True),
    "c16": (16, ["o_proj", "down_proj", "up_proj"], 8.0, False),
}


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return {name: make_peft_adapter(tiny_llama_dir, root / name, r, t, a, seed=i, use_rslora=rs, std=0.3,
                                    base_model=base)
            for i, (name, (r, t, a, rs)) in enumerate(ADAPTER_SPECS.items())}


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
              adapters: dict[str, Path] | None = None, names: list[str | None] | None = None):
    """Greedy continuations from transformers (+ PEFT), one prompt at a time, and for each the logits
    [new tokens, vocab] that chose every generated token."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = base
    if adapters:
        from peft import PeftModel

        items = list(adapters.items())
        model = PeftModel.from_pretrained(base, items[0][1], adapter_name=items[0][0])
        for name, path in items[1:]:
            model.load_adapter(path, adapter_name=name)
        model.eval()
    names = names or [None] * len(prompts)
    tokens, logits = [], []
    with torch.no_grad():
        for prompt, name in zip(prompts, names):
            ids = torch.tensor([prompt])
            if name is None and adapters:
                ctx = model.disable_adapter()
            else:
                if name is not None:
                    model.set_adapter(name)
                ctx = _nullcontext()
            with ctx:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
                # the logits that chose each generated token, from one full forward pass
                logits.append(model(input_ids=out[:, :-1]).logits[0, len(prompt) - 1:].float())
            tokens.append(out[0, len(prompt):].tolist())
    return tokens, logits


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="session")
def hf_reference():
    """hf_greedy as a fixture (conftest helpers are not importable under --import-mode=importlib)."""
    return hf_greedy


@pytest.fixture(scope="session")
def peft_adapter_factory():
    return make_peft_adapter
