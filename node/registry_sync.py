"""Registry sync: AdapterRegistry and DatanetRegistry -> the ledger's mirror and the local adapter store.

    sync()                 read every adapter registered for this node's base model (state, not only
                           events, so a node that was down misses nothing), mirror adapters and their
                           Datanets into the ledger (prices and splits are what requests are billed by),
                           and, with `download=True`, pull adapters not yet in the store;
    resolve_unknown(name)  the serving side's cold-start hook: an adapter registered but not downloaded
                           is pulled on first use; None when no such adapter is registered (-> 404).

Downloads go through node.registry.AdapterFetcher (size caps, SSRF guard, sha256 of the archive against
the registry's contentHash, atomic unpack). A mismatch is refused, logged, and remembered: the adapter is
never served, and it is not retried until the registry's content hash changes.
The store keeps a small `.openlora-source.json` next to each adapter recording the content hash it was
verified against, so an adapter whose registry content changed is fetched again.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from attribution.ledger import AdapterInfo, Ledger
from node.registry import AdapterFetcher, FetchError, HashMismatch, check_adapter_name

log = logging.getLogger(__name__)

SOURCE_FILE = ".openlora-source.json"


@dataclass(frozen=True)
class RegisteredAdapter:
    adapter_id: int
    name: str
    owner: str
    datanet_id: int  # 0: none
    content_hash: str  # 0x + 64 hex: sha256 of the published archive
    uri: str
    version: int
    active: bool
    price_per_m_input: int
    price_per_m_output: int
    owner_bps: int
    contributors_bps: int
    operator_bps: int


class RegistrySync:
    def __init__(self, adapter_registry, datanet_registry, ledger: Ledger, base_model: str, fetcher: AdapterFetcher):
        self.adapters, self.datanets = adapter_registry, datanet_registry
        self.ledger, self.base_model, self.fetcher = ledger, base_model, fetcher
        self.refused: dict[str, str] = {}  # adapter name -> content hash that failed verification
        self._lock = threading.Lock()  # one download of one adapter at a time
        self._timer: threading.Timer | None = None
        self._stopped = threading.Event()
        self._synced_block: int | None = None
        # the last registry state mirrored per adapter name (what GET /v1/models shows beyond the ledger: URI)
        self.known: dict[str, RegisteredAdapter] = {}

    @classmethod
    def from_deployment(cls, w3, dep, ledger: Ledger, settings) -> RegistrySync:
        from node.chain.artifacts import load_artifact

        adapters = w3.eth.contract(address=dep.address("AdapterRegistry"), abi=load_artifact("AdapterRegistry").abi)
        datanets = w3.eth.contract(address=dep.address("DatanetRegistry"), abi=load_artifact("DatanetRegistry").abi)
        base = settings.served_model_name or Path(settings.model).name
        return cls(adapters, datanets, ledger, base, AdapterFetcher(settings.resolved_adapter_dir))

    # -- chain reads ------------------------------------------------------------------------------

    def registered(self) -> list[RegisteredAdapter]:
        ids = self.adapters.functions.adaptersByBaseModel(self.base_model).call()
        return [self._read(i) for i in ids]

    def _read(self, adapter_id: int) -> RegisteredAdapter:
        a = self.adapters.functions.getAdapter(adapter_id).call()
        (owner, version, active, owner_bps, contributors_bps, operator_bps, p_in, p_out, datanet_id, content_hash,
         _created, _updated, name, _base, uri) = a
        return RegisteredAdapter(int(adapter_id), name, owner.lower(), int(datanet_id), "0x" + bytes(content_hash).hex(),
                                 uri, int(version), bool(active), int(p_in), int(p_out), int(owner_bps),
                                 int(contributors_bps), int(operator_bps))

    # -- mirror -----------------------------------------------------------------------------------

    def mirror(self, a: RegisteredAdapter, block: int) -> None:
        if a.datanet_id:
            d = self.datanets.functions.getDatanet(a.datanet_id).call()
            owner, _created, _updated, _hash, metadata_uri = d
            self.ledger.upsert_datanet(a.datanet_id, owner, metadata_uri=metadata_uri, synced_block=block)
        self.ledger.upsert_adapter(AdapterInfo(
            adapter_id=a.adapter_id, owner=a.owner, price_per_m_input=a.price_per_m_input,
            price_per_m_output=a.price_per_m_output, owner_bps=a.owner_bps, contributors_bps=a.contributors_bps,
            operator_bps=a.operator_bps, datanet_id=a.datanet_id or None, name=a.name, content_hash=a.content_hash,
            active=a.active, synced_block=block))
        self.known[a.name] = a

    def sync(self, *, download: bool = False) -> dict[str, str]:
        """Mirror every registered adapter; returns name -> state (mirrored, downloaded, present, refused, ...)."""
        block = self.adapters.w3.eth.block_number
        out: dict[str, str] = {}
        seen: dict[str, int] = {}
        for a in self.registered():
            try:
                check_adapter_name(a.name)
            except FetchError as exc:
                out[f"#{a.adapter_id}"] = f"skipped: {exc}"
                continue
            if a.name in seen:
                # names are what clients ask for; the first registration keeps the name
                out[f"{a.name}#{a.adapter_id}"] = f"skipped: name already used by adapter {seen[a.name]}"
                continue
            seen[a.name] = a.adapter_id
            self.mirror(a, block)
            out[a.name] = "mirrored" if a.active else "inactive"
            if download and a.active:
                out[a.name] = self._ensure_local(a)
        return out

    def changed_since(self, from_block: int, to_block: int) -> set[int]:
        """Adapter ids with a registry event in [from_block, to_block] (registered, content, price,
        deactivated, transferred): what an incremental sync re-reads."""
        ids: set[int] = set()
        for name in ("AdapterRegistered", "AdapterContentUpdated", "AdapterPriceUpdated", "AdapterDeactivated",
                     "AdapterTransferred"):
            for ev in getattr(self.adapters.events, name)().get_logs(from_block=from_block, to_block=to_block):
                ids.add(int(ev["args"]["adapterId"]))
        return ids

    def sync_changes(self) -> dict[str, str]:
        """Incremental sync: the first call reads every adapter (state), later calls only those with
        registry events since the last synced block. Events of adapters for other base models are read
        and skipped (the base model is in the state, not in every event)."""
        head = self.adapters.w3.eth.block_number
        if self._synced_block is None:
            out = self.sync()
        elif head <= self._synced_block:
            return {}
        else:
            out = {}
            for adapter_id in sorted(self.changed_since(self._synced_block + 1, head)):
                a = self._read(adapter_id)
                if self._base_of(adapter_id) != self.base_model:
                    continue
                self.mirror(a, head)
                out[a.name] = "mirrored" if a.active else "inactive"
        self._synced_block = head
        return out

    def _base_of(self, adapter_id: int) -> str:
        return self.adapters.functions.getAdapter(adapter_id).call()[13]

    # -- the store --------------------------------------------------------------------------------

    def _local_hash(self, name: str) -> str | None:
        try:
            return json.loads((self.fetcher.store_dir / name / SOURCE_FILE).read_text())["content_hash"]
        except (OSError, ValueError, KeyError):
            return None

    def _ensure_local(self, a: RegisteredAdapter) -> str:
        with self._lock:
            if self._local_hash(a.name) == a.content_hash:
                return "present"
            if self.refused.get(a.name) == a.content_hash:
                return "refused"
            try:
                path = self.fetcher.fetch(a.uri, a.content_hash, a.name)
            except HashMismatch as exc:
                self.refused[a.name] = a.content_hash
                log.error("adapter %s (id %d) refused: %s", a.name, a.adapter_id, exc)
                return "refused"
            except FetchError as exc:
                log.warning("adapter %s (id %d) could not be downloaded: %s", a.name, a.adapter_id, exc)
                return f"error: {exc}"
            (path / SOURCE_FILE).write_text(json.dumps({"adapter_id": a.adapter_id, "content_hash": a.content_hash,
                                                        "uri": a.uri, "version": a.version}))
            log.info("adapter %s (id %d, version %d) downloaded and verified", a.name, a.adapter_id, a.version)
            return "downloaded"

    def resolve_unknown(self, name: str) -> Path | None:
        """Pull a registered, active adapter on first use. None when not registered for this base model;
        raises node.errors.NotFound when registered but refused (hash mismatch) or not downloadable."""
        from node.errors import NotFound

        try:
            check_adapter_name(name)
        except FetchError:
            return None
        # a name belongs to its first registration (as in sync); deactivated means not served
        match = next((a for a in self.registered() if a.name == name), None)
        if match is None or not match.active:
            return None
        self.mirror(match, self.adapters.w3.eth.block_number)
        state = self._ensure_local(match)
        if state in ("present", "downloaded"):
            return self.fetcher.store_dir / name
        raise NotFound(f"adapter {name!r} is registered but could not be served ({state})", code="adapter_unavailable")

    # -- background -------------------------------------------------------------------------------

    def start(self, every_s: float) -> None:
        """Mirror the registry every `every_s` seconds (downloads stay on demand: resolve_unknown)."""
        def run():
            if self._stopped.is_set():
                return
            try:
                self.sync_changes()
            except Exception:  # an RPC outage must not stop later syncs
                log.exception("registry sync failed")
            self._timer = threading.Timer(every_s, run)
            self._timer.daemon = True
            self._timer.start()
        self._stopped.clear()
        run()

    def stop(self) -> None:
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()


__all__ = ["RegisteredAdapter", "RegistrySync"]
