"""Verified adapter download: from a registry URI to an unpacked PEFT folder in the adapter store.

An adapter is published as one archive (`.tar`, `.tar.gz` or `.zip`) holding `adapter_config.json` and
`adapter_model.safetensors` (optionally a README and an attribution index). The registry records the
sha256 of the archive bytes; nothing is unpacked before that hash matches, and nothing is served from a
folder that was not unpacked completely (the final rename is atomic).

Sources:
- `https://...`               any public host;
- `http://...`                only to a loopback address (local demo and tests);
- `ipfs://CID[/path]`         through the configured gateway (`ipfs_gateway`, e.g. https://gw.example/ipfs/);
- `file:///abs/path`          a local file (operators publishing on the same box).
Every network hop (including redirects, followed by hand) resolves the host and refuses private,
link-local, multicast and reserved addresses (SSRF), and loopback unless `allow_loopback`.
Downloads stream with a byte cap, explicit timeouts, and retries with exponential backoff on
transport errors and 5xx answers (never on 4xx).
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from node.errors import NodeError


class FetchError(NodeError):
    """An adapter could not be downloaded or unpacked."""


class UnsafeSource(FetchError):
    """The URI's scheme or address is not allowed (SSRF guard)."""


class HashMismatch(FetchError):
    """The downloaded bytes do not match the sha256 recorded on chain."""


ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
_OPTIONAL = ("README.md", "attribution_index.safetensors", "attribution_index.json")
_HEX64 = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME.match(name) or ".." in name:
        raise FetchError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def normalize_sha256(value: str | bytes) -> str:
    if isinstance(value, bytes):
        if len(value) != 32:
            raise FetchError("sha256 must be 32 bytes")
        return value.hex()
    if not _HEX64.match(value):
        raise FetchError(f"not a sha256 hex digest: {value!r}")
    return value.lower().removeprefix("0x")


@dataclass
class FetchLimits:
    max_bytes: int = 512 * 2**20          # archive size cap
    max_unpacked_bytes: int = 1024 * 2**20  # decompression-bomb guard
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5
    max_redirects: int = 3


@dataclass
class AdapterFetcher:
    store_dir: Path
    limits: FetchLimits = field(default_factory=FetchLimits)
    ipfs_gateway: str | None = None
    allow_loopback: bool = True
    progress: Callable[[int, int | None], None] | None = None
    transport: httpx.BaseTransport | None = None  # injectable for tests of fault handling

    # -- public -----------------------------------------------------------------------------------
    def fetch(self, uri: str, sha256: str | bytes, name: str) -> Path:
        """Download `uri`, verify `sha256`, unpack into `<store>/<name>` atomically; return the folder."""
        name = check_adapter_name(name)
        want = normalize_sha256(sha256)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".fetch-{name}-", dir=self.store_dir) as tmp:
            archive = Path(tmp) / "archive"
            got = self._download(uri, archive)
            if got != want:
                raise HashMismatch(f"adapter {name}: sha256 of {uri} is {got}, registry says {want}; refused")
            staged = Path(tmp) / "unpacked"
            unpack_archive(archive, staged, self.limits.max_unpacked_bytes)
            final = self.store_dir / name
            if final.exists():
                old = Path(tmp) / "previous"
                os.replace(final, old)
            os.replace(staged, final)
        return final

    # -- download ---------------------------------------------------------------------------------
    def _download(self, uri: str, dest: Path) -> str:
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme == "file":
            return self._copy_file(Path(unquote(parts.path)), dest)
        if scheme == "ipfs":
            if not self.ipfs_gateway:
                raise UnsafeSource("ipfs:// URIs need a configured ipfs_gateway")
            cid_path = (parts.netloc + parts.path).lstrip("/")
            return self._http(urljoin(self.ipfs_gateway.rstrip("/") + "/", cid_path), dest)
        if scheme in ("http", "https"):
            return self._http(uri, dest)
        raise UnsafeSource(f"scheme {scheme or '(none)'!r} is not allowed (https, http on loopback, ipfs, file)")

    def _copy_file(self, path: Path, dest: Path) -> str:
        if not path.is_absolute() or not path.is_file():
            raise FetchError(f"file URI does not name an existing regular file: {path}")
        if path.stat().st_size > self.limits.max_bytes:
            raise FetchError(f"{path} is larger than the {self.limits.max_bytes}-byte cap")
        h = hashlib.sha256()
        with open(path, "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        return h.hexdigest()

    def check_url(self, url: str) -> None:
        """Refuse URLs whose scheme or resolved addresses are not allowed."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise UnsafeSource(f"scheme {scheme!r} is not allowed here")
        host = parts.hostname
        if not host:
            raise UnsafeSource(f"URL has no host: {url}")
        try:
            infos = socket.getaddrinfo(host, parts.port or (443 if scheme == "https" else 80), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise FetchError(f"cannot resolve {host}: {exc}") from None
        addrs = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
        for ip in addrs:
            if ip.is_loopback:
                if not self.allow_loopback:
                    raise UnsafeSource(f"{host} resolves to loopback address {ip}; not allowed")
                continue
            if not ip.is_global or ip.is_multicast:
                raise UnsafeSource(f"{host} resolves to non-public address {ip}; refused (SSRF guard)")
            if scheme == "http":
                raise UnsafeSource(f"plain http is allowed only to loopback, not {host}")

    def _http(self, url: str, dest: Path) -> str:
        lim = self.limits
        timeout = httpx.Timeout(lim.read_timeout, connect=lim.connect_timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                with httpx.Client(timeout=timeout, follow_redirects=False, transport=self.transport) as client:
                    return self._get_following_redirects(client, url, dest)
            except (httpx.TransportError, _Retryable) as exc:
                if attempt > lim.retries:
                    raise FetchError(f"download of {url} failed after {attempt} attempts: {exc}") from None
                time.sleep(lim.backoff_s * 2 ** (attempt - 1))

    def _get_following_redirects(self, client: httpx.Client, url: str, dest: Path) -> str:
        for _ in range(self.limits.max_redirects + 1):
            self.check_url(url)
            with client.stream("GET", url) as resp:
                if resp.is_redirect:
                    url = urljoin(url, resp.headers.get("location", ""))
                    continue
                if resp.status_code >= 500:
                    raise _Retryable(f"HTTP {resp.status_code}")
                if resp.status_code != 200:
                    raise FetchError(f"GET {url} answered HTTP {resp.status_code}")
                return self._stream_to(resp, dest)
        raise FetchError(f"too many redirects from {url}")

    def _stream_to(self, resp: httpx.Response, dest: Path) -> str:
        cap = self.limits.max_bytes
        total = resp.headers.get("content-length")
        total_n = int(total) if total and total.isdigit() else None
        if total_n is not None and total_n > cap:
            raise FetchError(f"adapter archive is {total_n} bytes, over the {cap}-byte cap")
        h = hashlib.sha256()
        done = 0
        with open(dest, "wb") as out:
            for chunk in resp.iter_bytes(1 << 16):
                done += len(chunk)
                if done > cap:
                    raise FetchError(f"adapter archive exceeds the {cap}-byte cap")
                h.update(chunk)
                out.write(chunk)
                if self.progress:
                    self.progress(done, total_n)
        return h.hexdigest()


class _Retryable(Exception):
    pass


# -- archives ---------------------------------------------------------------------------------------

def unpack_archive(archive: Path, out_dir: Path, max_unpacked_bytes: int) -> None:
    """Extract only the known adapter files, refusing links, paths and oversized members."""
    out_dir.mkdir(parents=True)
    with open(archive, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        members = _zip_members(archive)
    else:
        members = _tar_members(archive)
    total = 0
    seen = set()
    for name, size, read in members:
        base = _member_name(name)
        if base is None:
            continue  # directory entries
        if base in seen:
            raise FetchError(f"archive holds {base} twice")
        total += size
        if total > max_unpacked_bytes:
            raise FetchError(f"archive unpacks to more than {max_unpacked_bytes} bytes")
        seen.add(base)
        data = read()
        if len(data) != size:
            raise FetchError(f"archive member {base} is truncated")
        (out_dir / base).write_bytes(data)
    missing = [f for f in _REQUIRED if f not in seen]
    if missing:
        raise FetchError(f"archive lacks {', '.join(missing)} (a PEFT adapter needs adapter_config.json and adapter_model.safetensors)")


def _member_name(name: str) -> str | None:
    """Map an archive member to an allowed file name, or raise for anything unexpected."""
    if name.endswith("/"):
        return None
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or name.startswith("/"):
        raise FetchError(f"archive member {name!r} has an unsafe path")
    if len(parts) > 2:
        raise FetchError(f"archive member {name!r} is nested too deep")
    base = parts[-1]
    if base not in _REQUIRED + _OPTIONAL:
        raise FetchError(f"archive member {base!r} is not an adapter file (only safetensors + JSON are accepted)")
    return base


def _tar_members(archive: Path):
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise FetchError(f"adapter archive is neither zip nor tar: {exc}") from None
    with tf:
        for m in tf.getmembers():
            if m.isdir():
                yield m.name + "/", 0, lambda: b""
                continue
            if not m.isfile():
                raise FetchError(f"archive member {m.name!r} is a link or device; refused")
            yield m.name, m.size, (lambda m=m: tf.extractfile(m).read())


def _zip_members(archive: Path):
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"bad zip archive: {exc}") from None
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                yield info.filename, 0, lambda: b""
                continue
            mode = (info.external_attr >> 16) & 0o170000
            if mode and mode != 0o100000:
                raise FetchError(f"archive member {info.filename!r} is not a regular file; refused")
            yield info.filename, info.file_size, (lambda info=info: zf.read(info))


def pack_adapter(adapter_dir: Path, out: Path) -> str:
    """Write a deterministic tar.gz of a PEFT folder (sorted members, zeroed times); return its sha256."""
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for fname in sorted(_REQUIRED + _OPTIONAL):
            p = adapter_dir / fname
            if not p.exists():
                if fname in _REQUIRED:
                    raise FetchError(f"{adapter_dir} lacks {fname}")
                continue
            data = p.read_bytes()
            info = tarfile.TarInfo(fname)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    gz = gzip.compress(buf.getvalue(), mtime=0)
    out.write_bytes(gz)
    return hashlib.sha256(gz).hexdigest()
