"""The Triton kernels the interpreter cannot vouch for compile for an H100 (scripts/compile_sm90.py): the CPU run
of a kernel never builds its typed IR, so a kernel can pass every interpreted test and still fail on the GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(extra_env=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_sm90.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_kernel_the_launchers_start_compiles_for_sm90():
    r = _run()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    done = re.search(r"(\d+) of (\d+) kernel variants compiled", r.stdout)
    assert done and done.group(1) == done.group(2)
    # every kernel module is reached: LoRA (decode and prefill tiles), elementwise, attention, 4-bit matmul
    for name in ("_lora_shrink_kernel", "_lora_expand_kernel", "_lora_expand_silu_mul_kernel", "_add_rmsnorm_kernel",
                 "_silu_mul_kernel", "_rope_write_kv_kernel", "_write_kv_kernel", "_paged_attention_kernel",
                 "_quant_matmul_kernel"):
        assert f"ok    {name} " in r.stdout, name
    # prefill tiles too, compiled with the launch's options (the register cap is one, like the warps)
    from kernels.lora import TUNING

    opts = {"maxnreg": TUNING["silu_maxnreg"], "num_warps": TUNING["silu_warps_tall"]}
    opts = {k: v for k, v in opts.items() if v}
    assert f"_lora_expand_silu_mul_kernel {opts} BLOCK_M=64" in r.stdout


def test_refuses_to_run_interpreted():
    r = _run({"TRITON_INTERPRET": "1"})
    assert r.returncode == 2 and "TRITON_INTERPRET" in r.stderr
