"""The Triton kernels the interpreter cannot vouch for compile for an H100 (scripts/compile_sm90.py): the CPU run
of a kernel never builds its typed IR, so a kernel can pass every interpreted test and still fail on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(extra_env=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_sm90.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_fused_gate_up_kernel_compiles_for_sm90():
    r = _run()
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 4 and "FAIL" not in r.stdout


def test_refuses_to_run_interpreted():
    r = _run({"TRITON_INTERPRET": "1"})
    assert r.returncode == 2 and "TRITON_INTERPRET" in r.stderr
