"""Native CPU kernels for decode-sized steps (kernels/csrc/cpu_decode.cpp), loaded through ctypes.

What costs the engine most on a CPU decode step, natively: the base matmul at a few tokens (`gemm`, a
register-blocked kernel over a panel-packed copy of the weight, where torch's BLAS calls are tuned for
larger batches), the LoRA delta of each token's own adapter with its influence norms (`lora`, one pass
instead of ~8 small torch ops of a few microseconds each), attention from the fused qkv output
(`decode_attention`: RoPE, KV write, paged attention) and a whole decoder layer in one call
(`decoder_layer`, used by engine/models/native_decoder.py for decode steps of up to MAX_GEMM_TOKENS).

The library is compiled on first use with the host's C++ compiler (`-O3 -march=native`, the machine it runs
on) into a cache directory keyed by the source, the flags and the CPU's feature flags, so a changed source
or another CPU never loads a stale build. No compiler, a failed build or OPENLORA_NATIVE_CPU=0: `load()` is
None and the engine keeps its torch paths (same results up to float rounding). Needs only the standard
library and torch, like the rest of kernels/.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_decode.cpp"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
# steps up to this many tokens take the native matmul: measured at 1-16 tokens on SmolLM2's shapes it beats
# oneDNN's packed matmul (e.g. 28 vs 40 ms per 8-token step, one thread), at 32 they are even and above it
# oneDNN wins, so prefill stays on oneDNN
MAX_GEMM_TOKENS = 16

_P = ctypes.c_void_p
_L = ctypes.c_long
_I = ctypes.c_int

_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    env = os.environ.get("OPENLORA_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "openlora" / "native"


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them), or the platform where /proc is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build() -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++) on PATH")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), cxx.encode(), _cpu_flags().encode()]))
    out_dir = _cache_dir()
    lib = out_dir / f"cpu_decode-{key.hexdigest()[:20]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: processes building at once each finish with a whole file
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.ol_pack_size.restype = _L
    lib.ol_pack_size.argtypes = [_L, _L]
    lib.ol_pack.argtypes = [_P, _L, _L, _L, _L, _P]
    lib.ol_gemm.argtypes = [_P, _L, _L, _L, _P, _L, _P, _P, _L, _I]
    lib.ol_lora.argtypes = [_P, _L, _L, _L, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _L, _L, _P]
    lib.ol_decode_attention.argtypes = [_P, _L, _L, _I, _I, _I, _P, _P, _P, _P, _L, _P, _P, _L, _P,
                                        ctypes.c_float, _P, _I]
    lib.ol_layer.argtypes = [ctypes.POINTER(OlLayer), ctypes.POINTER(OlStep), _P, _P]
    for f in (lib.ol_pack, lib.ol_gemm, lib.ol_lora, lib.ol_decode_attention, lib.ol_layer):
        f.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, built on first call; None (once logged) where it cannot be had."""
    if os.environ.get("OPENLORA_NATIVE_CPU", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _bind(ctypes.CDLL(str(_build())))
            except Exception as exc:  # noqa: BLE001 -- any failure leaves the torch paths, which are complete
                log.warning("native CPU kernels unavailable (%s); using torch's matmuls", exc)
                _state["lib"] = None
        return _state["lib"]


def available() -> bool:
    return load() is not None


@dataclass
class PackedWeight:
    """A weight [n, k] as ol_gemm reads it: panels of output columns, each [k][panel width], zero-padded."""

    data: torch.Tensor  # float32, 1-D
    n: int
    k: int


def pack(w: torch.Tensor) -> PackedWeight:
    lib = load()
    assert lib is not None and w.dtype == torch.float32 and w.dim() == 2 and not w.is_cuda
    w = w.detach()
    n, k = w.shape
    data = torch.empty(lib.ol_pack_size(n, k), dtype=torch.float32)
    lib.ol_pack(w.data_ptr(), n, k, w.stride(0), w.stride(1), data.data_ptr())
    return PackedWeight(data, n, k)


def gemm(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, k] @ W.T + bias -> [M, n], float32 on CPU."""
    lib = load()
    assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == w.k and not x.is_cuda
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape[0], w.n, dtype=torch.float32)
    if bias is not None:
        assert bias.dtype == torch.float32 and bias.is_contiguous() and bias.shape == (w.n,)
    lib.ol_gemm(x.data_ptr(), x.shape[0], w.k, x.stride(0), w.data.data_ptr(), w.n,
                None if bias is None else bias.data_ptr(), y.data_ptr(), w.n, torch.get_num_threads())
    return y


@dataclass
class NativeRows:
    """A projection's live adapter rows (kernels.lora.LiveRows) laid out for ol_lora: the tensors it reads and
    the small arrays describing the slices, built once per gathered LiveRows (kept alive here)."""

    a: torch.Tensor  # [R, K] float32, contiguous
    row_slot: torch.Tensor  # [R] int32
    bts: list[torch.Tensor]  # per slice [rows, width] float32, contiguous
    bound0: torch.Tensor  # [S] int64
    bound1: torch.Tensor  # [S] int64
    bt_ptrs: ctypes.Array
    col: torch.Tensor  # [S] int64: each slice's first column in y
    width: torch.Tensor  # [S] int64


def native_rows(rows, cols: list[int]) -> NativeRows:
    """NativeRows of `rows` (a kernels.lora.LiveRows) whose slices start at columns `cols` of the output."""
    a = rows.a.detach().float().contiguous()
    bts = [bt.detach().float().contiguous() for bt in rows.bt]
    assert len(cols) == len(bts) == len(rows.bounds)
    ptrs = (ctypes.c_void_p * max(1, len(bts)))(*[bt.data_ptr() for bt in bts])
    return NativeRows(a, rows.row_slots.to(torch.int32).contiguous(), bts,
                      torch.tensor([b[0] for b in rows.bounds], dtype=torch.int64),
                      torch.tensor([b[1] for b in rows.bounds], dtype=torch.int64), ptrs,
                      torch.tensor(cols, dtype=torch.int64), torch.tensor([bt.shape[1] for bt in bts], dtype=torch.int64))


def lora(x: torch.Tensor, y: torch.Tensor, rows: NativeRows, token_slots: torch.Tensor, scale: torch.Tensor,
         influence_sum: torch.Tensor | None = None) -> None:
    """y [M, N] += each token's LoRA delta (its slot's rows only, times scale[slot]); slot -1 adds nothing.
    With influence_sum ([M] float32), each token also adds |delta| / max(|y before|, 1e-6) over its whole row."""
    lib = load()
    assert x.dtype == y.dtype == torch.float32 and y.is_contiguous() and x.shape[0] == y.shape[0]
    assert token_slots.dtype == torch.int32 and token_slots.is_contiguous() and token_slots.shape[0] == x.shape[0]
    assert scale.dtype == torch.float32 and scale.is_contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    if influence_sum is not None:
        assert influence_sum.dtype == torch.float32 and influence_sum.is_contiguous()
    lib.ol_lora(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), token_slots.data_ptr(), rows.a.data_ptr(),
                rows.row_slot.data_ptr(), len(rows.bts), rows.bound0.data_ptr(), rows.bound1.data_ptr(),
                rows.bt_ptrs, rows.col.data_ptr(), rows.width.data_ptr(), scale.data_ptr(), y.data_ptr(),
                y.stride(0), y.shape[1], None if influence_sum is None else influence_sum.data_ptr())


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """One attention layer of a pure-decode step (one query token per sequence, T == B) from the fused qkv
    output [T, (H + 2 Hkv) D]: RoPE on q and k (cos, sin [T, D], rotate-half), k and v written into the paged
    caches [blocks, block_size, Hkv, D] at slot_mapping [T] int64 (< 0: not written), then attention over each
    sequence's seq_lens[t] cached tokens through block_tables [T, max_blocks] int32 -> [T, H D]."""
    lib = load()
    T = qkv.shape[0]
    _, block_size, hkv, d = k_cache.shape
    assert qkv.dtype == k_cache.dtype == v_cache.dtype == cos.dtype == sin.dtype == torch.float32
    assert qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * hkv) * d
    assert num_heads % hkv == 0 and d % 2 == 0
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
    assert cos.is_contiguous() and sin.is_contiguous() and cos.numel() == sin.numel() == T * d
    assert slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous() and slot_mapping.shape == (T,)
    assert block_tables.dtype == seq_lens.dtype == torch.int32 and block_tables.is_contiguous()
    assert block_tables.shape[0] == seq_lens.shape[0] == T and seq_lens.is_contiguous()
    out = torch.empty(T, num_heads * d, dtype=torch.float32)
    lib.ol_decode_attention(qkv.data_ptr(), T, qkv.stride(0), num_heads, hkv, d, cos.data_ptr(), sin.data_ptr(),
                            k_cache.data_ptr(), v_cache.data_ptr(), block_size, slot_mapping.data_ptr(),
                            block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(), scale,
                            out.data_ptr(), torch.get_num_threads())
    return out


# ---- one decoder layer per call (ol_layer): the C structs, mirrored ------------------------------------------

class OlLora(ctypes.Structure):
    _fields_ = [("a", _P), ("row_slot", _P), ("nslices", _I), ("bound0", _P), ("bound1", _P), ("bt", _P),
                ("col", _P), ("width", _P)]


class OlProj(ctypes.Structure):
    _fields_ = [("wp", _P), ("n", _L), ("k", _L), ("bias", _P), ("lora", OlLora)]


class OlLayer(ctypes.Structure):
    _fields_ = [("norm1", _P), ("norm2", _P), ("eps", ctypes.c_float), ("qkv", OlProj), ("o", OlProj),
                ("gate_up", OlProj), ("down", OlProj), ("k_cache", _P), ("v_cache", _P)]


class OlStep(ctypes.Structure):
    _fields_ = [("T", _L), ("hidden", _L), ("inter", _L), ("H", _I), ("Hkv", _I), ("D", _I), ("block_size", _L),
                ("max_blocks", _L), ("scale", ctypes.c_float), ("cos", _P), ("sin", _P), ("slots", _P),
                ("block_tables", _P), ("seq_lens", _P), ("token_slot", _P), ("lora_scale", _P), ("infl_sum", _P),
                ("threads", _I)]


def set_proj(proj: OlProj, w: PackedWeight, bias: torch.Tensor | None) -> None:
    """Point `proj` at a packed weight and its bias (the caller keeps both alive)."""
    assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.shape == (w.n,))
    proj.wp, proj.n, proj.k = w.data.data_ptr(), w.n, w.k
    proj.bias = None if bias is None else bias.data_ptr()


def set_lora(proj: OlProj, rows: NativeRows | None) -> None:
    """Point `proj`'s LoRA at `rows` (the caller keeps them alive), or switch it off with None."""
    lo = proj.lora
    if rows is None or rows.a.shape[0] == 0:
        lo.a = None
        return
    lo.a, lo.row_slot, lo.nslices = rows.a.data_ptr(), rows.row_slot.data_ptr(), len(rows.bts)
    lo.bound0, lo.bound1 = rows.bound0.data_ptr(), rows.bound1.data_ptr()
    lo.bt = ctypes.cast(rows.bt_ptrs, ctypes.c_void_p).value
    lo.col, lo.width = rows.col.data_ptr(), rows.width.data_ptr()


def decoder_layer(layer: OlLayer, step: OlStep, hs: torch.Tensor, res: torch.Tensor) -> None:
    """One decoder layer in place: res += hs, then hs = the layer's output (see ol_layer)."""
    load().ol_layer(ctypes.byref(layer), ctypes.byref(step), hs.data_ptr(), res.data_ptr())
