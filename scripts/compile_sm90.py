"""Compile Triton kernels for an H100 (sm90) on a machine without a GPU: catches what the interpreter lets pass.

The CPU tests run the kernels through TRITON_INTERPRET, which executes them as numpy code and never builds the
typed IR; a kernel that assigns one name tensors of two shapes across an if/else, for instance, runs there and
fails to compile on the GPU. Triton's front end and the NVIDIA back end (ptxas ships in the wheel) need no GPU,
so this compiles each listed kernel, with the constexpr settings the engine launches it with, down to a cubin.

    python scripts/compile_sm90.py        # exit 1 and the compiler's message when a kernel does not compile

Must run without TRITON_INTERPRET (tests/kernels/test_compile_sm90.py starts it as a subprocess).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Triton 3.9 warns that its FP-fusion default will change; keep what it does now (fused multiply-adds)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import lora  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def _compile(kernel, pointers: dict[str, str], constexprs: dict) -> int:
    """Compile `kernel` with these pointer types (others i32) and constexprs; returns the cubin's size."""
    names = kernel.arg_names
    sig = {n: pointers.get(n) or ("constexpr" if n in constexprs else "i32") for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return len(triton.compile(src, target=SM90).asm["cubin"])


def silu_expand_cases():
    """lora_expand_silu_mul's kernel: decode and prefill tiles, influence on and off, bf16 and float32 models."""
    for bm, bn, influence, dt in [(16, 128, True, "bf16"), (16, 128, False, "bf16"), (64, 128, True, "bf16"),
                                  (16, 128, True, "fp32")]:
        ptrs = {"gu_ptr": f"*{dt}", "out_ptr": f"*{dt}", "h_ptr": "*fp32", "bg_ptr": f"*{dt}", "bu_ptr": f"*{dt}",
                "rank_ptr": "*i32", "scale_ptr": "*fp32", "sorted_ids_ptr": "*i32", "tile_start_ptr": "*i32",
                "tile_end_ptr": "*i32", "tile_slot_ptr": "*i32", "num_live_ptr": "*i32", "infl_ptr": "*fp32"}
        const = dict(BLOCK_M=bm, BLOCK_N=bn, R_PAD=16, PRECISION="tf32" if dt == "bf16" else "ieee",
                     INFLUENCE=influence, SHORT_ROWS=4, NATIVE_ROUND=True)
        yield f"_lora_expand_silu_mul_kernel {dt} BLOCK_M={bm} INFLUENCE={influence}", \
            lora._lora_expand_silu_mul_kernel, ptrs, const


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_sm90: unset TRITON_INTERPRET (the interpreter builds no IR)", file=sys.stderr)
        return 2
    failed = 0
    for label, kernel, ptrs, const in silu_expand_cases():
        try:
            size = _compile(kernel, ptrs, const)
            print(f"ok    {label}: cubin {size} bytes")
        except Exception as e:  # the compiler's own message is the point
            failed += 1
            print(f"FAIL  {label}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
