"""`openlora model pull|import|list|rm`: the local model cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from node import models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="manage the local model cache", description="Manage the local model cache.")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    msub.required = True

    pull = msub.add_parser("pull", help="download and import an embedded model",
                           description=f"Download and import an embedded model ({', '.join(models.EMBEDDED)}).")
    pull.add_argument("name", help="model name, e.g. smollm2-135m-instruct")
    pull.add_argument("--force", action="store_true", help="re-download even if cached")
    pull.set_defaults(func=_pull)

    imp = msub.add_parser("import", help="import a Llama-family GGUF file",
                          description="Dequantize a Llama-family GGUF file into a cached HF-format directory.")
    imp.add_argument("file", type=Path, help="path to a .gguf file")
    imp.add_argument("--name", help="name in the cache (default: file stem)")
    imp.set_defaults(func=_import)

    ls = msub.add_parser("list", help="list cached models", description="List cached models.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_list)

    rm = msub.add_parser("rm", help="remove a cached model", description="Remove a cached model.")
    rm.add_argument("name")
    rm.set_defaults(func=_rm)


def _pull(args, settings) -> int:
    path = models.pull(args.name, settings.models_dir, force=args.force)
    print(path)
    return 0


def _import(args, settings) -> int:
    print(models.import_file(args.file, settings.models_dir, name=args.name))
    return 0


def _list(args, settings) -> int:
    cached = models.list_cached(settings.models_dir)
    if args.json:
        print(json.dumps([{"name": m.name, "path": str(m.path), "architecture": m.architecture,
                           "size_bytes": m.size_bytes} for m in cached], indent=2))
        return 0
    if not cached:
        print(f"no models cached in {settings.models_dir}; try `openlora model pull smollm2-135m-instruct`")
        return 0
    print(f"{'NAME':32} {'ARCHITECTURE':20} {'SIZE':>10}  PATH")
    for m in cached:
        print(f"{m.name:32} {m.architecture:20} {m.size_bytes / 2**20:>8.1f}Mi  {m.path}")
    return 0


def _rm(args, settings) -> int:
    models.remove(args.name, settings.models_dir)
    print(f"removed {args.name}")
    return 0
