"""Kernel tests run the Triton kernels through the interpreter on CPU-only machines.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, so it is set here, at import time,
before the test modules import `kernels.*`. If something imported Triton or the kernels first (transformers
imports Triton), Triton's own @jit helpers are re-wrapped and our kernel modules reloaded so that every @jit
function runs in the interpreter (setting TRITON_INTERPRET=1 in the environment of a CPU-only CI run, or in
the root conftest, makes this unnecessary). On a CUDA machine the kernels compile.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

ON_GPU = torch.cuda.is_available()



def _rewrap_triton_language_for_interpreter() -> None:
    """Triton was imported before this file ran (transformers imports it), so its own @jit helpers
    (tl.cdiv, tl.sum's combine functions, ...) were built as compiled functions that refuse to run in the
    interpreter. Re-wrap them as interpreted functions (Triton's C extension cannot be imported twice)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, val in list(vars(mod).items()):
            if isinstance(val, JITFunction):
                setattr(mod, attr, InterpretedFunction(val.fn))


if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        _rewrap_triton_language_for_interpreter()
    # dependencies first: kernels.lora's fused activation calls kernels.elementwise's _round_to
    for _name in ("kernels.attention", "kernels.elementwise", "kernels.lora", "kernels.quant"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
