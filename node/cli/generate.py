"""`openlora generate`: run the engine once from the command line.

Every adapter given with `--adapter NAME=PATH` answers the same prompt, all in one mixed batch (plus the
base model with `--base`, or alone when no adapter is given); `--mix` adds a fused mix of registered
adapters. Text goes to stdout as it is generated for a single answer; `--json` prints one object with
every answer, its usage and influence statistics.
"""

from __future__ import annotations

import argparse
import json
import sys

from node import models
from node.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the base model and LoRA adapters",
                       description="Generate text with the base model and any number of LoRA adapters in one batch.")
    p.add_argument("prompt", help="the prompt (a user message with --chat)")
    p.add_argument("--model", help="model name in the cache or a HF-format directory (default: settings.model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a PEFT adapter folder; repeatable, each one answers the prompt")
    p.add_argument("--mix", action="append", default=[], metavar="NAME=W,NAME=W",
                   help="a fused mix of registered adapters with weights; repeatable")
    p.add_argument("--mix-strategy", default="linear", choices=("linear", "ties", "dare"))
    p.add_argument("--base", action="store_true", help="also answer with the base model when adapters are given")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the model's chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("-n", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--logprobs", type=int, help="return logprobs with this many alternatives")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--device", help="cpu or cuda (default: settings.device)")
    p.add_argument("--quantization", help="base weights: none or q4 (4-bit) (default: settings.engine_quantization)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_generate)


def engine_quantization(name: str) -> str | None:
    """A settings/CLI quantization name as EngineConfig takes it ("none" -> None; the engine checks the rest)."""
    return None if name.strip().lower() == "none" else name.strip().lower()


def _parse_pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{what} must look like NAME=VALUE, got {item!r}")
        pairs.append((name, value))
    return pairs


def _generate(args, settings) -> int:
    import torch

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    model_dir = models.resolve(args.model or settings.model, settings.models_dir)
    device = args.device or settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    adapters = _parse_pairs(args.adapter, "--adapter")
    # every adapter answers in the same batch, so each needs its own slot
    slots = max(settings.engine_num_lora_slots, len(adapters) + len(args.mix))
    config = EngineConfig(device=device, num_lora_slots=slots, max_lora_rank=settings.engine_max_lora_rank,
                          max_num_seqs=settings.engine_max_num_seqs,
                          quantization=engine_quantization(args.quantization or settings.engine_quantization),
                          quant_group_size=settings.engine_quant_group_size,
                          cpu_native_kernels=settings.engine_cpu_native_kernels)
    config.validate()  # a bad --quantization is refused before the model is read
    engine = LLMEngine(model_dir, config)
    refs: list = []
    for name, path in adapters:
        engine.register_adapter(name, path)
        refs.append(name)
    for spec in args.mix:
        from engine.adapters.fusion import FusedMix

        members = []
        for name, w in _parse_pairs(spec.split(","), "--mix member"):
            try:
                members.append((name, float(w)))
            except ValueError:
                raise ConfigError(f"--mix weight of {name} must be a number, got {w!r}") from None
        refs.append(FusedMix(tuple(members), strategy=args.mix_strategy))
    if not refs or args.base:
        refs.insert(0, None)

    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = engine.tokenizer.encode_chat(messages + [{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, n=args.n, stop=args.stop, logprobs=args.logprobs,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    ids = [engine.add_request(prompt, params, ref) for ref in refs]
    stream = not args.json and len(ids) == 1 and args.n == 1
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if stream:
                sys.stdout.write(out.completions[0].delta_text)
                sys.stdout.flush()
            if out.finished:
                done[out.request_id] = out
    if stream:
        sys.stdout.write("\n")
        return 0
    results = [_as_dict(ref, done[rid]) for ref, rid in zip(refs, ids)]
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for r in results:
        for c in r["completions"]:
            index = f" #{c['index']}" if args.n > 1 else ""
            print(f"--- {r['adapter'] or 'base'}{index} ({c['finish_reason']})")
            print(c["text"])
    return 0


def _as_dict(ref, out) -> dict:
    name = None if ref is None else (ref if isinstance(ref, str) else "+".join(f"{n}:{w}" for n, w in ref.members))
    return {
        "adapter": name,
        "completions": [{"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                         "logprobs": c.logprobs} for c in out.completions],
        "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                  "cached_tokens": out.cached_tokens},
        "influence": out.influence,
    }
