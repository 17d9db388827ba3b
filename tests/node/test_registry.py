"""Verified adapter download over real loopback HTTP: hashes, SSRF guard, limits, hostile archives."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from node.registry import (
    AdapterFetcher,
    FetchError,
    FetchLimits,
    HashMismatch,
    UnsafeSource,
    pack_adapter,
)


def _adapter_dir(tmp_path: Path) -> Path:
    d = tmp_path / "src-adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)))
    return d


class _Server:
    """A loopback HTTP server whose routes are set per test: path -> (status, headers, body)."""

    def __init__(self):
        self.routes: dict[str, list] = {}
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits[self.path] = hits.get(self.path, 0) + 1
                answers = routes.get(self.path, [(404, {}, b"")])
                status, headers, body = answers[0] if len(answers) == 1 else answers.pop(0)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def packed(tmp_path):
    archive = tmp_path / "a.tar.gz"
    digest = pack_adapter(_adapter_dir(tmp_path), archive)
    return archive, digest


def _fetcher(tmp_path, **kw) -> AdapterFetcher:
    limits = kw.pop("limits", FetchLimits(backoff_s=0.01))
    return AdapterFetcher(tmp_path / "store", limits=limits, **kw)


def test_pack_is_deterministic(tmp_path):
    d = _adapter_dir(tmp_path)
    assert pack_adapter(d, tmp_path / "x.tgz") == pack_adapter(d, tmp_path / "y.tgz")


def test_fetch_over_loopback_http_verifies_and_unpacks(server, packed, tmp_path):
    archive, digest = packed
    server.routes["/a.tgz"] = [(200, {}, archive.read_bytes())]
    out = _fetcher(tmp_path).fetch(server.url + "/a.tgz", digest, "my-adapter")
    assert out == tmp_path / "store" / "my-adapter"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_config.json").read_bytes() == (tmp_path / "src-adapter" / "adapter_config.json").read_bytes()


def test_hash_mismatch_is_refused_and_leaves_nothing(server, packed, tmp_path):
    archive, digest = packed
    server.routes["/a.tgz"] = [(200, {}, archive.read_bytes())]
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(HashMismatch):
        _fetcher(tmp_path).fetch(server.url + "/a.tgz", wrong, "my-adapter")
    assert list((tmp_path / "store").iterdir()) == []


def test_a_failed_update_keeps_the_previous_version(server, packed, tmp_path):
    archive, digest = packed
    server.routes["/a.tgz"] = [(200, {}, archive.read_bytes())]
    f = _fetcher(tmp_path)
    out = f.fetch(server.url + "/a.tgz", digest, "a")
    server.routes["/b.tgz"] = [(200, {}, b"tampered")]
    with pytest.raises(HashMismatch):
        f.fetch(server.url + "/b.tgz", digest, "a")
    assert (out / "adapter_model.safetensors").exists()


def test_retries_5xx_with_backoff_then_succeeds(server, packed, tmp_path):
    archive, digest = packed
    server.routes["/a.tgz"] = [(503, {}, b""), (500, {}, b""), (200, {}, archive.read_bytes())]
    _fetcher(tmp_path).fetch(server.url + "/a.tgz", digest, "a")
    assert server.hits["/a.tgz"] == 3


def test_4xx_is_not_retried(server, packed, tmp_path):
    _, digest = packed
    with pytest.raises(FetchError, match="HTTP 404"):
        _fetcher(tmp_path).fetch(server.url + "/missing", digest, "a")
    assert server.hits["/missing"] == 1


def test_size_cap_refuses_large_archives(server, packed, tmp_path):
    archive, digest = packed
    server.routes["/a.tgz"] = [(200, {}, archive.read_bytes())]
    with pytest.raises(FetchError, match="cap"):
        _fetcher(tmp_path, limits=FetchLimits(max_bytes=100)).fetch(server.url + "/a.tgz", digest, "a")


@pytest.mark.parametrize(
    "uri",
    [
        "http://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
        "http://10.0.0.7/a.tgz",                   # private
        "https://192.168.1.1/a.tgz",               # private
        "http://[fe80::1]/a.tgz",                   # IPv6 link-local
        "ftp://127.0.0.1/a.tgz",                    # scheme
        "gopher://127.0.0.1/",                      # scheme
        "ipfs://bafy/a.tgz",                        # no gateway configured
    ],
)
def test_unsafe_sources_are_refused_before_any_connection(uri, tmp_path):
    with pytest.raises(UnsafeSource):
        _fetcher(tmp_path).fetch(uri, "0" * 64, "a")


def test_loopback_refused_when_not_allowed(server, packed, tmp_path):
    _, digest = packed
    with pytest.raises(UnsafeSource, match="loopback"):
        _fetcher(tmp_path, allow_loopback=False).fetch(server.url + "/a.tgz", digest, "a")


def test_redirect_to_a_private_address_is_refused(server, packed, tmp_path):
    _, digest = packed
    server.routes["/r"] = [(302, {"Location": "http://10.1.2.3/a.tgz"}, b"")]
    with pytest.raises(UnsafeSource):
        _fetcher(tmp_path).fetch(server.url + "/r", digest, "a")


def test_ipfs_goes_through_the_gateway(server, packed, tmp_path):
    archive, digest = packed
    server.routes["/ipfs/bafyabc/a.tgz"] = [(200, {}, archive.read_bytes())]
    f = _fetcher(tmp_path, ipfs_gateway=server.url + "/ipfs/")
    assert f.fetch("ipfs://bafyabc/a.tgz", digest, "a").is_dir()


def test_file_uri(packed, tmp_path):
    archive, digest = packed
    assert _fetcher(tmp_path).fetch(archive.as_uri(), digest, "a").is_dir()


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 200])
def test_unsafe_adapter_names_are_refused(name, packed, tmp_path):
    archive, digest = packed
    with pytest.raises(FetchError, match="invalid adapter name"):
        _fetcher(tmp_path).fetch(archive.as_uri(), digest, name)


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    "members, match",
    [
        ([_file("../adapter_config.json"), _file("adapter_model.safetensors")], "unsafe path"),
        ([_file("/etc/adapter_config.json"), _file("adapter_model.safetensors")], "unsafe path"),
        ([_link("adapter_config.json", "/etc/passwd"), _file("adapter_model.safetensors")], "link"),
        ([_file("adapter_config.json"), _file("adapter_model.bin")], "not an adapter file"),
        ([_file("adapter_config.json"), _file("evil.pkl")], "not an adapter file"),
        ([_file("adapter_config.json")], "lacks adapter_model.safetensors"),
    ],
)
def test_hostile_archives_are_refused(members, match, tmp_path):
    data = _tar(members)
    archive = tmp_path / "bad.tar"
    archive.write_bytes(data)
    with pytest.raises(FetchError, match=match):
        _fetcher(tmp_path).fetch(archive.as_uri(), hashlib.sha256(data).hexdigest(), "a")
    assert not (tmp_path / "store" / "a").exists()


def test_zip_archives_work_and_bombs_are_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", "{}")
        zf.writestr("adapter_model.safetensors", b"\0" * 4_000_000)
    data = buf.getvalue()
    archive = tmp_path / "a.zip"
    archive.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert _fetcher(tmp_path).fetch(archive.as_uri(), digest, "ok").is_dir()
    small = FetchLimits(max_unpacked_bytes=1_000_000)
    with pytest.raises(FetchError, match="unpacks to more"):
        _fetcher(tmp_path, limits=small).fetch(archive.as_uri(), digest, "bomb")
