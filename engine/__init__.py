"""The multi-LoRA inference engine: models, adapters, paged KV cache, scheduler, sampling.

Knows nothing about HTTP, money, chains or SQL (see DESIGN.md). A request flows one way:

    LLMEngine.add_request ─▶ Sequence (sequence.py) ─▶ Scheduler (scheduler.py: token budget, chunked
    prefill, FCFS admission against BlockManager blocks and AdapterCache slots, preemption)
      ─▶ SchedulerOutput ─▶ ModelRunner (model_runner.py: flat token batch, block tables, slot mapping,
         per-token adapter slot -> LoRABatchMeta, set once per step in context.py)
      ─▶ LlamaForCausalLM (models/llama.py, from layers/: LoRA linear, rotary, rmsnorm, paged attention;
         kernels reached only through kernels.dispatch) ─▶ Sampler (layers/sampler.py)
      ─▶ LLMEngine: stop checks, incremental detokenization (tokenizer.py), influence (influence.py)
      ─▶ RequestOutput (deltas + totals); AsyncLLMEngine (async_engine.py) streams them.

Configuration is data: ModelConfig (from config.json) and EngineConfig, both in config.py; weights come
from HF safetensors directories through loader.py. Errors are the EngineError family in errors.py.
"""
