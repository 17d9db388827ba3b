"""AdapterCache: registered adapters moved disk -> host -> device slot just in time.

A request for an adapter that is not resident starts a background load and gets None; the caller asks
again next step, so only that request waits and every other request keeps its slot. A slot with
references is never evicted; pinned adapters are never evicted from either tier.

Threads: the caller's thread (request/release/...) and one loader thread. One lock guards all
bookkeeping; the loader does file I/O, fusion and tensor copies without it, writing only into the slot
reserved for its job. Host copies are packed (one buffer per adapter in the slot layout, see
engine.adapters.packed); on CUDA that buffer is pinned and the host -> device copy (one upload plus a
device copy per module) runs on a side stream with an event; a slot is handed out only once that event
has completed, and a load into a slot waits for the event recorded when its previous adapter's last
reference was released.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.adapters.fusion import FusedMix, FusionReport, ResolvedMix, fuse_linear, fuse_merge, resolve_mix
from engine.adapters.host_cache import HostCache
from engine.adapters.peft_format import (
    ALL_MODULES, AdapterSpec, AdapterWeights, ParsedAdapter, ReadTimings, check_name, module_shapes,
    pack_weights, parse_adapter, read_weights,
)
from engine.adapters.slot_pool import SlotPool
from engine.errors import AdapterError, AdapterNotFound, EngineConfigError

AdapterRef = str | FusedMix
RESERVE_BLOCKS = 16  # default pinned reserve, in slot-sized blocks (see AdapterCache.__init__)


@dataclass
class TierCounters:
    hits: int = 0  # the adapter was already in this tier
    misses: int = 0  # it had to be brought into this tier
    bytes: int = 0  # bytes moved into this tier
    ms: float = 0.0  # time spent moving them
    evictions: int = 0


@dataclass
class _Load:
    key: str
    slot: int | None  # None: warm the host tier only
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    weights: AdapterWeights | None = None  # kept alive until an async device copy has finished
    start_event: Any = None
    end_event: Any = None
    nbytes: int = 0


_STOP = object()


class AdapterCache:
    def __init__(
        self,
        model_config: Any,
        *,
        num_slots: int,
        max_rank: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        host_bytes: int = 4 << 30,
        max_adapter_bytes: int = 1 << 30,
        target_modules: tuple[str, ...] | list[str] = ALL_MODULES,
        base_model: str | None = None,
        background: bool = True,
        pinned_reserve_bytes: int | None = None,
    ) -> None:
        """pinned_reserve_bytes (CUDA only): pinned host memory allocated and released at start, in
        blocks of one slot's size, so that PyTorch's caching host allocator hands the first cold loads
        ready pinned blocks: allocating ~84 MB of fresh pinned memory takes ~50-80 ms on an H100 host,
        three times the rest of a disk -> GPU load. Default: host_bytes, at most RESERVE_BLOCKS blocks
        (~1 s at start for the 8B shape). Once the host tier is full its evictions recycle blocks the
        same way; 0 turns the reserve off."""
        unknown = set(target_modules) - set(ALL_MODULES)
        target_modules = tuple(m for m in ALL_MODULES if m in set(target_modules))
        if not target_modules or unknown:
            raise EngineConfigError(f"target_modules must be a non-empty subset of {ALL_MODULES}")
        if num_slots < 1 or max_rank < 1 or host_bytes < 0 or max_adapter_bytes < 1:
            raise EngineConfigError("num_slots, max_rank and max_adapter_bytes must be >= 1, host_bytes >= 0")
        self.model_config = model_config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_rank = max_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.target_modules = target_modules
        self.base_model = base_model
        self.background = background
        self._shapes = module_shapes(model_config)
        self._cuda = self.device.type == "cuda"
        self.pool = SlotPool.create(model_config, num_slots, max_rank, target_modules, self.device, dtype)
        self.host = HostCache(host_bytes)
        self.disk_to_host = TierCounters()
        self.disk_to_host_detail = ReadTimings()  # where the file reads' share of disk_to_host.ms goes
        self.host_to_device = TierCounters()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified when a load finishes
        self._specs: dict[str, AdapterSpec] = {}  # name -> spec
        self._parsed: dict[str, ParsedAdapter] = {}  # content hash -> parsed (while some name maps to it)
        self._mixes: dict[str, ResolvedMix] = {}  # mix key -> resolved mix
        self.fusion_reports: dict[str, FusionReport] = {}  # mix key -> SVD truncation errors
        self._slot_of: dict[str, int] = {}  # key -> slot (ready or loading)
        self._loads: dict[str, _Load] = {}  # key -> device load in flight
        self._prefetching: set[str] = set()
        self._errors: dict[str, AdapterError] = {}  # key -> failure of a background load, raised once
        self._pinned: set[str] = set()  # adapter names
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        if self._cuda:
            self._reserve_pinned(host_bytes if pinned_reserve_bytes is None else pinned_reserve_bytes,
                                 default=pinned_reserve_bytes is None)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = None
        if background:
            self._worker = threading.Thread(target=self._work, name="adapter-loader", daemon=True)
            self._worker.start()

    def _reserve_pinned(self, limit: int, default: bool) -> None:
        numel = self.pool.staging.numel()
        block = numel * self.pool.staging.element_size()
        count = min(RESERVE_BLOCKS, limit // block) if default else limit // block
        blocks = [torch.empty(numel, dtype=self.dtype, pin_memory=True) for _ in range(count)]
        del blocks  # back to the caching host allocator's free list, pinned, for the loader to reuse

    # ------------------------------------------------------------------ registration

    def register(self, name: str, path: str | Path) -> AdapterSpec:
        """Validate an adapter folder and make it servable under `name`. A refused adapter changes nothing;
        re-registering a name with new content evicts the old content from every tier."""
        check_name(name)
        parsed = parse_adapter(
            name, path, self.model_config, max_rank=self.max_rank, max_adapter_bytes=self.max_adapter_bytes,
            target_modules=self.target_modules, base_model=self.base_model, dtype=self.dtype,
        )
        spec = parsed.spec
        with self._lock:
            old = self._specs.get(name)
            self._specs[name] = spec
            self._parsed[spec.content_hash] = parsed
            if old is not None and old.content_hash != spec.content_hash:
                self._drop_key(old.content_hash)
        return spec

    def unregister(self, name: str) -> None:
        with self._lock:
            spec = self._spec_of_name(name)
            self.unload(name)
            del self._specs[name]
            self._pinned.discard(name)
            self._drop_key(spec.content_hash)

    def _spec_of_name(self, name: str) -> AdapterSpec:
        spec = self._specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise AdapterNotFound(f"no adapter named {name!r}")
        return spec

    def _resolve(self, ref: AdapterRef) -> tuple[str, AdapterSpec]:
        if isinstance(ref, FusedMix):
            elt = torch.empty((), dtype=self.dtype).element_size()
            resolved = resolve_mix(ref, self._specs, self.max_rank, self._shapes,
                                   int(self.model_config.num_hidden_layers), elt)
            self._mixes.setdefault(resolved.key, resolved)
            return resolved.key, resolved.spec
        spec = self._spec_of_name(ref)
        return spec.content_hash, spec

    def _live(self, key: str) -> bool:
        return key in self._parsed or key in self._mixes

    def _drop_key(self, key: str) -> None:
        """Forget content no name maps to any more, and every mix built from it (lock held)."""
        if any(s.content_hash == key for s in self._specs.values()):
            return
        self._parsed.pop(key, None)
        self._evict_everywhere(key)
        for mix_key, mix in list(self._mixes.items()):
            if any(s.content_hash == key for s, _ in mix.members):
                del self._mixes[mix_key]
                self.fusion_reports.pop(mix_key, None)
                self._evict_everywhere(mix_key)

    def _evict_everywhere(self, key: str) -> None:
        self.host.remove(key)
        slot = self._slot_of.get(key)
        if slot is None:
            return
        s = self.pool.slots[slot]
        if not s.ready:
            load = self._loads[key]
            if load.done.is_set():  # CUDA copy queued, event not yet seen: later work on the stream is ordered
                self._loads.pop(key, None)
                self._free_slot(slot)
            else:
                load.cancelled = True  # the loader frees the slot when its copy ends
        elif s.refcount == 0:
            self._free_slot(slot)
        # in use: stays until the last release, which frees it because the key is no longer live

    def _free_slot(self, index: int) -> None:
        key = self.pool.slots[index].key
        if key is not None and self._slot_of.get(key) == index:
            del self._slot_of[key]
        if self._cuda:
            with torch.cuda.stream(self._stream):
                self.pool.clear(index, self._stream)
        else:
            self.pool.clear(index)
        self.pool.forget(index)

    # ------------------------------------------------------------------ the hot path

    def request(self, ref: AdapterRef, wait_s: float = 0.0) -> int | None:
        """Take a reference to the slot holding `ref` and return it; if it is not resident, start loading
        it and return None (call again next step). Unknown names and bad mixes raise at once.

        wait_s > 0 (CUDA): a load started by this call may be waited for that long until its device copy is
        queued; the slot is then handed out at once and the caller's current stream waits for the copy's
        event, so the request joins the step about to launch instead of the next one. The step is delayed
        on the GPU by the copy (~2 ms for an 8B rank-16 adapter), the request saves a whole step of TTFT."""
        with self._lock:
            self._reap()
            key, spec = self._resolve(ref)
            err = self._errors.pop(key, None)
            if err is not None:
                raise err
            slot = self._slot_of.get(key)
            if slot is not None:
                if not self._ready(key, slot, stream_wait=self._cuda):
                    return None
                self.pool.incref(slot)
                self.host_to_device.hits += 1
                return slot
            load = self._start(key)
            if load is None:
                return None
            if self.background and not (wait_s > 0 and self._cuda):
                return None
        if self.background:
            # the loader thread reads the host tier and queues the copy; this thread lets go of the GIL here
            if not load.done.wait(wait_s):
                return None
            with self._lock:
                err = self._errors.pop(key, None)
                if err is not None:
                    raise err
                if self._slot_of.get(key) != load.slot or not self._ready(key, load.slot, stream_wait=True):
                    return None
                self.pool.incref(load.slot)
                return load.slot
        # synchronous fallback: load inline, outside the lock, then hand out the slot
        self._run(load)
        with self._lock:
            err = self._errors.pop(key, None)
            if err is not None:
                raise err
            if not self._ready(key, load.slot):
                return None
            self.pool.incref(load.slot)
            return load.slot

    def _ready(self, key: str, slot: int, stream_wait: bool = False) -> bool:
        """Whether the slot's load has finished; completes CUDA loads whose event has fired (lock held).
        With `stream_wait`, a CUDA load whose copy is queued but not finished counts too: the caller's current
        stream is made to wait for it (kernels launched there later see the adapter)."""
        if self.pool.slots[slot].ready:
            return True
        load = self._loads.get(key)
        if load is None or not load.done.is_set() or load.end_event is None:
            return False
        if not load.end_event.query():
            if not stream_wait:
                return False
            torch.cuda.current_stream(self.device).wait_event(load.end_event)
            return True
        self._complete(load, load.start_event.elapsed_time(load.end_event))
        return True

    def _reap(self) -> None:
        """Complete the CUDA loads whose copy has finished (lock held): slots handed out while their copy was
        still queued (request's wait_s) are marked ready and their pinned sources let go."""
        for load in list(self._loads.values()):
            if load.done.is_set() and load.end_event is not None and load.end_event.query():
                self._complete(load, load.start_event.elapsed_time(load.end_event))

    def _complete(self, load: _Load, ms: float) -> None:
        self.pool.slots[load.slot].ready = True
        self.host_to_device.bytes += load.nbytes
        self.host_to_device.ms += ms
        load.weights = None
        self._loads.pop(load.key, None)
        self._changed.notify_all()

    def _start(self, key: str) -> _Load | None:
        """Reserve a slot and queue the load; when every slot is busy, warm the host tier (lock held)."""
        acquired = self.pool.acquire(key, self._pinned_keys())
        if acquired is None:
            if self.background and key not in self.host and key not in self._prefetching:
                self._prefetching.add(key)
                self._submit(_Load(key, None))
            return None
        slot, evicted = acquired
        if evicted is not None:
            self._slot_of.pop(evicted, None)
            self.host_to_device.evictions += 1
        self._slot_of[key] = slot
        self.host_to_device.misses += 1
        load = _Load(key, slot)
        self._loads[key] = load
        if self.background:
            self._submit(load)
        return load

    def _submit(self, load: _Load) -> None:
        self._queue.put(load)

    def release(self, slot: int) -> None:
        with self._lock:
            s = self.pool.slots[slot]
            if s.refcount <= 0:
                raise AdapterError(f"slot {slot} released without a reference")
            if self.pool.decref(slot) == 0 and not self._live(s.key):
                self._free_slot(slot)

    # ------------------------------------------------------------------ the loader

    def _work(self) -> None:
        while True:
            load = self._queue.get()
            if load is _STOP:
                return
            self._run(load)

    def _run(self, load: _Load) -> None:
        try:
            weights = self._host_weights(load.key)
            if load.slot is not None:
                self._to_device(load, weights)
        except Exception as e:  # any failure becomes the request's AdapterError, never a dead worker
            err = e if isinstance(e, AdapterError) else AdapterError(f"loading adapter failed: {e!r}")
            with self._lock:
                self._errors[load.key] = err
                if load.slot is not None:
                    self._loads.pop(load.key, None)
                    self._free_slot(load.slot)
                load.done.set()
                self._changed.notify_all()
        finally:
            if load.slot is None:
                with self._lock:
                    self._prefetching.discard(load.key)

    def _to_device(self, load: _Load, weights: AdapterWeights) -> None:
        load.nbytes = weights.nbytes
        t0 = time.perf_counter()
        if self._cuda:
            load.weights = weights  # pinned source must outlive the async copy
            with torch.cuda.stream(self._stream):
                load.start_event = torch.cuda.Event(enable_timing=True)
                load.end_event = torch.cuda.Event(enable_timing=True)
                load.start_event.record(self._stream)
                self.pool.write(load.slot, weights, self._stream)
                load.end_event.record(self._stream)
        else:
            self.pool.write(load.slot, weights)
        ms = (time.perf_counter() - t0) * 1000.0
        with self._lock:
            if load.cancelled or not self._live(load.key):
                self._loads.pop(load.key, None)
                self._free_slot(load.slot)
                self._changed.notify_all()
            elif not self._cuda:
                self._complete(load, ms)
            load.done.set()

    def _host_weights(self, key: str) -> AdapterWeights:
        """The adapter's weights from the host tier, reading (or fusing) them on a miss."""
        with self._lock:
            w = self.host.get(key)
            if w is not None:
                self.disk_to_host.hits += 1
                return w
            parsed, mix = self._parsed.get(key), self._mixes.get(key)
        if parsed is None and mix is None:
            raise AdapterError("adapter was unregistered or re-registered while loading")
        t0 = time.perf_counter()
        if parsed is not None:
            timings = ReadTimings()
            w = read_weights(parsed, self.dtype, pin_memory=self._cuda, timings=timings)
            ms = (time.perf_counter() - t0) * 1000.0
            with self._lock:
                for k, v in asdict(timings).items():
                    setattr(self.disk_to_host_detail, k, getattr(self.disk_to_host_detail, k) + v)
                self.disk_to_host.misses += 1
                self.disk_to_host.bytes += parsed.spec.file_bytes
                self.disk_to_host.ms += ms
                self._keep_on_host(key, w)
            return w
        members = [(self._host_weights(s.content_hash), weight) for s, weight in mix.members]
        if mix.strategy == "linear":
            w, report = fuse_linear(key, members, self.dtype), None
        else:
            w, report = fuse_merge(mix, members, self.dtype, self.device)
        w = pack_weights(w, self._shapes, int(self.model_config.num_hidden_layers), self.dtype, self._cuda)
        with self._lock:
            self.disk_to_host.misses += 1
            self.disk_to_host.ms += (time.perf_counter() - t0) * 1000.0
            if report is not None:
                self.fusion_reports[key] = report
            self._keep_on_host(key, w)
        return w

    def _keep_on_host(self, key: str, w: AdapterWeights) -> None:
        if self._live(key):
            self.disk_to_host.evictions += len(self.host.put(key, w, self._pinned_keys()))

    # ------------------------------------------------------------------ explicit control

    def _pinned_keys(self) -> set[str]:
        return {self._specs[n].content_hash for n in self._pinned if n in self._specs}

    def spec(self, ref: AdapterRef) -> AdapterSpec:
        with self._lock:
            return self._resolve(ref)[1]

    def is_ready(self, ref: AdapterRef) -> bool:
        """Poll: is `ref` resident in a slot (request would return it at once)?"""
        with self._lock:
            key, _ = self._resolve(ref)
            slot = self._slot_of.get(key)
            return slot is not None and self._ready(key, slot)

    def load(self, ref: AdapterRef, wait: bool = True, timeout: float | None = None) -> int | None:
        """Bring `ref` into a slot without keeping a reference. With wait, block until it is resident
        (or the timeout passes: None is returned) and return its slot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slot = self.request(ref)
            if slot is not None:
                self.release(slot)
                return slot
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                return None
            with self._lock:
                key, _ = self._resolve(ref)
                load = self._loads.get(key)
                if load is None or not load.done.is_set():
                    self._changed.wait(0.05)
            if load is not None and load.end_event is not None and load.done.is_set():
                load.end_event.synchronize()

    def unload(self, ref: AdapterRef) -> None:
        """Drop an adapter from the device and host tiers (it stays registered). Refused while in use."""
        with self._lock:
            key, _ = self._resolve(ref)
            slot = self._slot_of.get(key)
            if slot is not None and self.pool.slots[slot].refcount > 0:
                raise AdapterError(f"adapter {ref!r} is in use by {self.pool.slots[slot].refcount} "
                                   "request(s); it can be unloaded once they finish")
            if isinstance(ref, str):
                self._pinned.discard(ref)
            self._evict_everywhere(key)

    def pin(self, name: str) -> None:
        """Never evict `name` from the host or device tier; starts loading it if it is not resident."""
        with self._lock:
            spec = self._spec_of_name(name)
            keys = self._pinned_keys() | {spec.content_hash}
            if len(keys) >= self.pool.num_slots:
                raise AdapterError(f"cannot pin {name!r}: at most {self.pool.num_slots - 1} adapters may be "
                                   "pinned so that other adapters can still be served")
            self._pinned.add(name)
        slot = self.request(name)
        if slot is not None:
            self.release(slot)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._spec_of_name(name)
            self._pinned.discard(name)

    def list(self) -> list[tuple[AdapterSpec, str, int | None, int, bool]]:
        """(spec, tier, slot, refcount, pinned) for each registered adapter and each cached mix;
        tier is 'device', 'loading', 'host' or 'disk'."""
        with self._lock:
            rows = [(spec, spec.content_hash, name in self._pinned) for name, spec in sorted(self._specs.items())]
            rows += [(m.spec, k, False) for k, m in self._mixes.items() if k in self._slot_of or k in self.host]
            out = []
            for spec, key, pinned in rows:
                slot = self._slot_of.get(key)
                if slot is not None:
                    tier = "device" if self._ready(key, slot) else "loading"
                    out.append((spec, tier, slot, self.pool.slots[slot].refcount, pinned))
                else:
                    out.append((spec, "host" if key in self.host else "disk", None, 0, pinned))
            return out

    def stats(self) -> dict:
        with self._lock:
            return {
                "disk_to_host": asdict(self.disk_to_host),
                "disk_to_host_detail": asdict(self.disk_to_host_detail),
                "host_to_device": asdict(self.host_to_device),
                "host_bytes_used": self.host.used_bytes,
                "host_bytes_capacity": self.host.capacity_bytes,
                "host_entries": len(self.host.entries),
                "slots_total": self.pool.num_slots,
                "slots_used": sum(1 for s in self.pool.slots if s.key is not None),
                "slots_referenced": sum(1 for s in self.pool.slots if s.refcount > 0),
                "loads_in_flight": len(self._loads),
                "registered": len(self._specs),
                "pinned": len(self._pinned),
            }

    def close(self) -> None:
        """Stop the loader thread (queued loads finish first)."""
        if self._worker is not None and not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._worker.join()

    def __enter__(self) -> AdapterCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
