"""Mixed-adapter parity on CUDA: our engine vs transformers + PEFT on the same GPU, fp32 and bf16.

tests/engine/test_parity.py runs on the CPU only (and needs the cached SmolLM2 tokenizer), so this runs
its mixed-batch case on the GPU: a tiny random Llama (hidden 64, 2 layers, vocab 49152, tied), base +
3 PEFT adapters made by PEFT (q/v rank 8; MLP rank 16; all seven projections rank 16), 4 prompts of 12
tokens in one batch, 8 greedy tokens. Reports token agreement and the max relative L2 logit error per
row over the steps before the row's first differing token, with the engine's CUDA graphs off and on;
then a staggered workload (batches padded into several graph buckets) with graphs against without.

    python3 benchmarks/gpu_parity.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine import build_engine  # noqa: E402  (also puts the repository root on sys.path)

from engine.config import EngineConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

CFG = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
ADAPTERS = {"qv8": (8, ["q_proj", "v_proj"]), "mlp16": (16, ["gate_proj", "up_proj", "down_proj"]),
            "all16": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])}


def make_model(root: Path) -> tuple[Path, dict[str, Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model_dir = root / "tiny"
    model.to(torch.float32).save_pretrained(model_dir, safe_serialization=True)
    paths = {}
    base = model
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        pm.save_pretrained(root / name)
        base = pm.unload()
        paths[name] = root / name
    return model_dir, paths


def run(dtype_name: str, model_dir: Path, paths: dict[str, Path], n_new: int = 8, graphs: bool = True) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, CFG["vocab_size"] - 10, (4, 12), generator=g).tolist()
    names = [None, "qv8", "mlp16", "all16"]

    engine = _engine(model_dir, paths, dtype_name, graphs)
    engine.runner.keep_logits = True
    params = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
    rids = [engine.add_request(p, params, a) for p, a in zip(prompts, names)]
    logits = {r: [] for r in rids}
    tokens = {}
    while engine.has_unfinished():
        outs = engine.step()
        if engine.last_logits is not None:
            for row, rid in enumerate(engine.last_rows):
                logits[rid].append(engine.last_logits[row].float().cpu())
            engine.last_logits = None
        for o in outs:
            if o.finished:
                tokens[o.request_id] = o.token_ids
    graph_steps = engine.runner.graph_steps
    engine.close()
    del engine
    torch.cuda.empty_cache()

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda").eval()
    items = list(paths.items())
    peft = PeftModel.from_pretrained(hf, items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        peft.load_adapter(path, adapter_name=name)
    peft.eval()
    ids = torch.tensor(prompts, device="cuda")
    with torch.no_grad():
        out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                            min_new_tokens=n_new, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                            output_logits=True, adapter_names=[n or "__base__" for n in names])
    ref_tokens = out.sequences[:, ids.shape[1]:].tolist()
    ref_logits = torch.stack([x.float().cpu() for x in out.logits], dim=1)  # [4, n_new, vocab]
    rows = []
    for i, rid in enumerate(rids):
        ours, ref = tokens[rid], ref_tokens[i]
        agree = sum(a == b for a, b in zip(ours, ref))
        first_diff = next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
        errs = [float((logits[rid][k] - ref_logits[i, k]).norm() / ref_logits[i, k].norm())
                for k in range(min(first_diff + 1, len(logits[rid]), n_new))]
        rows.append(dict(adapter=names[i] or "base", agree=agree, of=len(ref), first_diff=first_diff,
                         max_rel_logit_err=max(errs) if errs else None, first_step_rel_err=errs[0] if errs else None))
    del peft, hf
    torch.cuda.empty_cache()
    return {"dtype": dtype_name, "cuda_graphs": graphs, "graph_steps": graph_steps, "rows": rows,
            "tokens_agree": sum(r["agree"] for r in rows), "tokens_total": sum(r["of"] for r in rows)}


def _engine(model_dir: Path, paths: dict[str, Path], dtype_name: str, graphs: bool, async_steps: bool | None = None):
    engine = build_engine(model_dir, EngineConfig(device="cuda", dtype=dtype_name, num_kv_blocks=256,
                                                  num_lora_slots=4, max_lora_rank=16, max_num_seqs=16,
                                                  cuda_graphs=graphs, async_steps=async_steps), random_weights=False)
    for name, path in paths.items():
        engine.register_adapter(name, path)
        engine.adapters.load(name)
    return engine


def _staggered(engine, prompts, params, names) -> list:
    """Requests join every other step (decode batches pad into several graph buckets); final outputs in order."""
    rids, done, step = [], {}, 0
    while len(rids) < len(prompts) or engine.has_unfinished():
        if len(rids) < len(prompts) and step % 2 == 0:
            k = len(rids)
            rids.append(engine.add_request(prompts[k], params[k], names[k]))
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        step += 1
    return [done[r] for r in rids]


def async_vs_one_at_a_time(dtype_name: str, model_dir: Path, paths: dict[str, Path]) -> dict:
    """EngineConfig.async_steps on CUDA: step k+1 queued before step k's tokens are read, its inputs taken from
    step k's sampled ids on the device. The staggered workload with mixed sampling (greedy, seeded top-p, logprobs,
    n=2, stop tokens that really occur, different lengths) and CUDA graphs on, async steps off and on: every
    token, logprob (to 1e-4) and finish reason should be the same."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, CFG["vocab_size"] - 10, (4 + 2 * i,), generator=g).tolist() for i in range(12)]
    names = [[None, "qv8", "mlp16", "all16"][i % 4] for i in range(12)]
    probe = _engine(model_dir, paths, dtype_name, True, async_steps=False)
    greedy = _staggered(probe, prompts, [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 12, names)
    probe.close()
    params = []
    for i in range(12):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=10, ignore_eos=True, n=2))
        elif kind == 2:  # stops at a token its greedy run produces 5th
            params.append(SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                         stop_token_ids=[greedy[i].token_ids[4]]))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=3 + i, ignore_eos=True))
    runs = {}
    for async_steps in (False, True):
        engine = _engine(model_dir, paths, dtype_name, True, async_steps=async_steps)
        runs[async_steps] = (_staggered(engine, prompts, params, names), engine.runner.graph_steps)
        engine.close()
        del engine
        torch.cuda.empty_cache()
    (one, _), (ahead, graph_steps) = runs[False], runs[True]
    same_tokens = same_finish = same_lp = 0
    total = 0
    for a, b in zip(one, ahead):
        for ca, cb in zip(a.completions, b.completions):
            total += 1
            same_tokens += ca.token_ids == cb.token_ids
            same_finish += (ca.finish_reason, ca.stop_reason) == (cb.finish_reason, cb.stop_reason)
            if ca.logprobs is None:
                same_lp += cb.logprobs is None
            else:
                same_lp += cb.logprobs is not None and len(ca.logprobs) == len(cb.logprobs) and all(
                    abs(x[0] - y[0]) < 1e-4 and [t for t, _ in x[1]] == [t for t, _ in y[1]]
                    for x, y in zip(ca.logprobs, cb.logprobs))
    stopped = sum(c.finish_reason == "stop" for o in one for c in o.completions)
    return {"dtype": dtype_name, "completions": total, "same_tokens": same_tokens, "same_finish": same_finish,
            "same_logprobs": same_lp, "stopped_by_token": stopped, "graph_steps_async": graph_steps}


def graphs_vs_eager(dtype_name: str, model_dir: Path, paths: dict[str, Path], n_new: int = 16) -> dict:
    """The same staggered workload (a request joins every other step, so decode batches of 1..12 rows
    pad into several buckets) with CUDA graphs and without: greedy tokens should be identical."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(10, CFG["vocab_size"] - 10, (5 + 3 * i,), generator=g).tolist() for i in range(12)]
    names = [[None, "qv8", "mlp16", "all16"][i % 4] for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
    result = {}
    for graphs in (False, True):
        engine = _engine(model_dir, paths, dtype_name, graphs)
        outs = _staggered(engine, prompts, [params] * len(prompts), names)
        result[graphs] = ([o.token_ids for o in outs], engine.runner.graph_steps,
                          len(engine.runner.graphs.graphs) if engine.runner.graphs else 0)
        engine.close()
        del engine
        torch.cuda.empty_cache()
    (eager, _, _), (graphed, steps, captured) = result[False], result[True]
    agree = sum(a == b for x, y in zip(eager, graphed) for a, b in zip(x, y))
    return {"dtype": dtype_name, "tokens_agree": agree, "tokens_total": sum(len(x) for x in eager),
            "requests_identical": sum(x == y for x, y in zip(eager, graphed)), "requests": len(eager),
            "graph_steps": steps, "graphs_captured": captured}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "CUDA only"
    root = Path(tempfile.mkdtemp(prefix="gpu-parity-"))
    model_dir, paths = make_model(root)
    results = {"device": torch.cuda.get_device_name(), "runs": []}
    for dt in ("float32", "bfloat16"):
        for graphs in (False, True):
            r = run(dt, model_dir, paths, graphs=graphs)
            results["runs"].append(r)
            print(f"{dt} (CUDA graphs {'on' if graphs else 'off'}, {r['graph_steps']} graph steps): "
                  f"tokens {r['tokens_agree']}/{r['tokens_total']} vs transformers + PEFT")
        for row in r["rows"]:
            print(f"  {row['adapter']:6} {row['agree']}/{row['of']} first diff at {row['first_diff']}, "
                  f"max rel logit err (up to first diff) {row['max_rel_logit_err']:.2e}, "
                  f"first step {row['first_step_rel_err']:.2e}")
    results["graphs_vs_eager"] = []
    for dt in ("float32", "bfloat16"):
        r = graphs_vs_eager(dt, model_dir, paths)
        results["graphs_vs_eager"].append(r)
        print(f"{dt} staggered, graphs vs eager: tokens {r['tokens_agree']}/{r['tokens_total']}, requests identical "
              f"{r['requests_identical']}/{r['requests']}, {r['graph_steps']} graph steps, "
              f"{r['graphs_captured']} graphs")
    results["async_vs_one_at_a_time"] = []
    for dt in ("float32", "bfloat16"):
        r = async_vs_one_at_a_time(dt, model_dir, paths)
        results["async_vs_one_at_a_time"].append(r)
        print(f"{dt} async steps vs one at a time (graphs on): completions with the same tokens "
              f"{r['same_tokens']}/{r['completions']}, finish {r['same_finish']}, logprobs {r['same_logprobs']}; "
              f"{r['stopped_by_token']} stopped by a stop token; {r['graph_steps_async']} graph steps")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
