"""`openlora serve`: the node's HTTP API under uvicorn.

    openlora serve [--host H] [--port P] [--model M]        paid serving (ledger, chain, payments)
    openlora serve --dev --adapter-dir DIR                  every PEFT folder in DIR under its folder
                                                            name; no chain, no payment, no admin token
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible API server",
                       description="Run the node's OpenAI-compatible API server.")
    p.add_argument("--host", help="address to bind (default from settings: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default 8000)")
    p.add_argument("--model", help="cached model name or HF-format directory")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--adapter-dir", type=Path, help="directory of PEFT adapter folders")
    p.add_argument("--quantization", choices=("none", "q4"),
                   help="base weights: none (model dtype) or q4 (4-bit) (default: settings.engine_quantization)")
    p.add_argument("--dev", action="store_true",
                   help="dev mode: serve --adapter-dir with no chain and no payment (receipts 'dev-...')")
    p.set_defaults(func=_serve)


def serving_engine_factory(settings):
    """The default engine, then the start-up objects (model, CUDA graphs, imported libraries: a few hundred
    thousand) frozen out of the cyclic collector's reach. This process serves one engine until it exits, and a
    full collection walking them all paused serving for ~120 ms on the H100 benchmark (17 ms frozen;
    benchmarks/RESULTS.md, session 6). Objects stay freed by reference counting; only cycles among them that
    become garbage later would stay, and the engine's live for the process's lifetime."""
    import gc

    from node.app import default_engine_factory

    bridge = default_engine_factory(settings)
    gc.collect()
    gc.freeze()
    return bridge


def _serve(args, settings) -> int:
    import uvicorn

    from node.app import create_app
    from node.config import load_settings
    from node.errors import ConfigError
    from node.logging import configure

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("model", args.model),
                                   ("device", args.device), ("adapter_dir", args.adapter_dir),
                                   ("engine_quantization", args.quantization)) if v is not None}
    if args.dev:
        overrides["dev"] = True
    if overrides:
        # CLI flags beat environment and file: rebuild the settings with them on top
        settings = load_settings(getattr(args, "config", None), **overrides)
    if settings.dev and not settings.resolved_adapter_dir.is_dir():
        raise ConfigError(f"--dev serves the adapters of {settings.resolved_adapter_dir}, which is not a directory "
                          "(pass --adapter-dir DIR)")
    configure(settings.log_level, settings.log_json)
    app = create_app(settings, engine_factory=serving_engine_factory)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                    timeout_graceful_shutdown=10)
    except SystemExit:
        # uvicorn exits when the lifespan fails; the cause (e.g. no node_id) becomes the CLI's error line
        if app.state.node.startup_error is not None:
            raise app.state.node.startup_error from None
        raise
    return 0

