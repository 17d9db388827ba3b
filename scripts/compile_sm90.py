"""Compile every Triton kernel for an H100 (sm90) on a machine without a GPU: catches what the interpreter lets pass.

The CPU tests run the kernels through TRITON_INTERPRET, which executes them as numpy code and never builds the
typed IR; a kernel that assigns one name tensors of two shapes across an if/else, for instance, runs there and
fails to compile on the GPU. Triton's front end and the NVIDIA back end (ptxas ships in the wheel) need no GPU.

This calls the real launchers (kernels/*.py) on small CPU tensors of the engine's layer shapes (Llama-3-8B widths,
a few tokens; bf16 and float32; decode and prefill tiles; influence on and off), with `JITFunction.run` replaced so
that a launch compiles the kernel for sm90, with the launch's argument types, constexprs and warps, instead of
running it. Each distinct compile is reported.

    python scripts/compile_sm90.py        # exit 1, with the compiler's message, when a kernel does not compile

Each compile is specialised as a real launch would be (16-byte aligned tensors, integers divisible by 16 that the
kernel does not exempt), and the script also checks the widths of the bf16 LoRA kernels' global accesses: a mask
whose bound the compiler cannot prove aligned makes every element its own 2-byte access, which ran the expand
kernels at a third of their speed (session 9). `SCALAR_LIMITS` is the number of such accesses a kernel may keep.

Must run without TRITON_INTERPRET (tests/kernels/test_compile_sm90.py starts it as a subprocess).
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Triton 3.9 warns that its FP-fusion default will change; keep what it does now (fused multiply-adds)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# 2-byte global loads/stores a bf16 kernel may keep: the row paths (tiles of a few tokens) of both expand kernels
# move a [BLOCK_N] row of y over all the program's threads, one element a thread where BLOCK_N is at most the thread
# count (3 accesses); the tile paths must move whole vectors (the unaligned expand had 96).
SCALAR_LIMITS = {"_lora_expand_kernel": 3, "_lora_expand_silu_mul_kernel": 3}
_SCALAR = re.compile(r"\b(?:ld|st)\.global(?:\.\w+)*\.b16\b")


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return _PTR[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v).__name__}")


class Compiler:
    """Stands in for JITFunction.run: compiles each distinct launch for sm90 and records the outcome."""

    def __init__(self):
        self.results: dict[tuple, str | None] = {}  # key -> None (compiled) or the error
        self.scalar: dict[tuple, int] = {}  # key -> 2-byte global accesses in the PTX (bf16 launches)

    def launch(self, kernel: JITFunction, args, kwargs) -> None:
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        bound = dict(zip(kernel.arg_names, args))
        bound.update(kwargs)
        sig, const, attrs = {}, {}, {}
        exempt = set(getattr(kernel, "do_not_specialize", ()))
        for i, p in enumerate(kernel.params):
            v = bound.get(p.name, p.default)
            if p.is_constexpr or v is None:
                sig[p.name], const[(i,)] = "constexpr", v
            else:
                sig[p.name] = _arg_type(v)
                # what a launch specialises on: aligned tensors (CPU tensors here are 64-byte aligned, as CUDA
                # allocations are) and integers divisible by 16, unless the kernel exempts them
                aligned = (v.data_ptr() % 16 == 0 if isinstance(v, torch.Tensor)
                           else not isinstance(v, bool) and isinstance(v, int) and v % 16 == 0
                           and p.name not in exempt and i not in exempt)
                if aligned:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        names = kernel.arg_names
        key = (kernel.fn.__name__, tuple(sorted(sig.items())),
               tuple((names[i[0]], str(v)) for i, v in sorted(const.items())), tuple(sorted(options.items())))
        if key in self.results:
            return
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs), target=SM90,
                                      options=options)
            self.results[key] = None
            if "*bf16" in sig.values():
                self.scalar[key] = len(_SCALAR.findall(compiled.asm["ptx"]))
        except Exception as e:  # the compiler's own message is the point
            self.results[key] = f"{type(e).__name__}: {e}"

    @contextmanager
    def installed(self):
        original = JITFunction.run
        compiler = self

        def run(kernel, *args, grid, warmup, **kwargs):
            compiler.launch(kernel, args, dict(kwargs))

        JITFunction.run = run
        try:
            yield self
        finally:
            JITFunction.run = original


def _rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


def launch_everything() -> None:
    """Every launcher the engine uses, at the shapes and settings it launches them with."""
    from kernels import attention, elementwise, lora, quant

    hidden, inter, heads, kv_heads, head_dim = 4096, 14336, 32, 8, 128
    for dtype in (torch.bfloat16, torch.float32):
        # LoRA: decode-sized (16-token tiles) and prefill-sized (64-token tiles) steps, 2 slots of rank 16
        for T in (5, 1100):
            slots = torch.tensor([0, 1, -1, 0, 1] * (T // 5 + 1), dtype=torch.int32)[:T]
            meta = lora.make_lora_meta(slots, num_slots=2)
            rank, scale = torch.tensor([16, 7], dtype=torch.int32), torch.ones(2)
            for outs, k_in in (([hidden, 1024, 1024], hidden), ([inter, inter], hidden), ([hidden], inter)):
                x = _rand(T, k_in, dtype=dtype)
                a = [_rand(2, 16, k_in, dtype=dtype) for _ in outs]
                b = [_rand(2, o, 16, dtype=dtype) for o in outs]
                h = lora.lora_shrink_triton(x, a, rank, meta)
                y = _rand(T, sum(outs), dtype=dtype)
                for infl in (None, torch.zeros(2, T)):
                    lora.lora_expand_triton(y, h, b, rank, scale, meta, influence=infl)
                    if len(outs) == 2:
                        lora.lora_expand_silu_mul_triton(y, h, b, rank, scale, meta, influence=infl)
        # elementwise
        x = _rand(3, hidden, dtype=dtype)
        w = _rand(hidden, dtype=dtype)
        elementwise.add_rmsnorm_triton(x, None, w, 1e-5)
        elementwise.add_rmsnorm_triton(x, x.clone(), w, 1e-5)
        elementwise.silu_mul_triton(_rand(3, 2 * inter, dtype=dtype))
        k_cache = torch.zeros(8, 16, kv_heads, head_dim, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        qkv = _rand(3, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
        cos, sin = _rand(3, 1, head_dim, dtype=dtype), _rand(3, 1, head_dim, dtype=dtype)
        elementwise.rope_write_kv_triton(qkv, cos, sin, k_cache, v_cache, torch.tensor([0, 1, 2]), heads, kv_heads,
                                         head_dim)
        # attention: KV write, decode (with and without a key split) and prefill
        kv = _rand(3, kv_heads, head_dim, dtype=dtype)
        attention.write_kv_triton(kv, kv.clone(), k_cache, v_cache, torch.tensor([0, 1, 2]))
        tables = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
        lens = torch.tensor([20, 5, 17], dtype=torch.int32)
        q = _rand(3, heads, head_dim, dtype=dtype)
        for splits in (1, 2):
            attention.paged_attention_triton(q, k_cache, v_cache, tables, lens, torch.arange(4, dtype=torch.int32),
                                             0.1, max_query_len=1, num_splits=splits)
        qp = _rand(9, heads, head_dim, dtype=dtype)
        attention.paged_attention_triton(qp, k_cache, v_cache, tables, lens, torch.tensor([0, 4, 5, 9],
                                         dtype=torch.int32), 0.1)
        # 4-bit base weights: decode and prefill row counts
        qw = quant.quantize_linear_weight(_rand(256, 512, dtype=dtype), group_size=128)
        for m in (3, 200):
            quant.quant_matmul_triton(_rand(m, 512, dtype=dtype), qw)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_sm90: unset TRITON_INTERPRET (the interpreter builds no IR)", file=sys.stderr)
        return 2
    with Compiler().installed() as c:
        launch_everything()
    failed = 0
    for key, err in c.results.items():
        name, _, const, options = key
        label = f"{name} {dict(options)} " + " ".join(f"{k}={v}" for k, v in const if v != "None")
        scalar, limit = c.scalar.get(key), SCALAR_LIMITS.get(name)
        if err is None and scalar is not None and limit is not None and scalar > limit:
            err = f"{scalar} 2-byte global loads/stores in the PTX (at most {limit}): a mask or address the compiler " \
                  "cannot prove aligned splits the bf16 accesses into single elements"
        if err is None:
            print(f"ok    {label[:150]}" + (f" (2-byte accesses: {scalar})" if scalar is not None else ""))
        else:
            failed += 1
            print(f"FAIL  {label[:150]}\n      {err}")
    print(f"{len(c.results) - failed} of {len(c.results)} kernel variants compiled for sm90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
