"""The multi-LoRA inference engine: models, adapters, paged KV cache, scheduler, sampling.

Knows nothing about HTTP, money, chains or SQL (see DESIGN.md).
"""
