"""The `openlora` command: one entry point, one module per command group under `node/cli/`.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its sub-commands and sets
`func(args, settings) -> int` on each. Errors of the project's exception families become one line on
stderr and exit code 1; usage errors exit 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.errors import EngineError
from node.errors import NodeError

# Order is the order of `openlora --help`.
COMMAND_MODULES = ("model", "generate", "serve", "chain", "db", "receipt", "init", "node_cmd", "adapters", "settle", "status",
                   "rewards", "datanet", "adapter")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _error_families() -> tuple[type[BaseException], ...]:
    families: list[type[BaseException]] = [NodeError, EngineError]
    for mod, name in (("attribution.errors", "LedgerError"), ("node.chain.errors", "ChainError")):
        try:
            families.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(families)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openlora",
        description="Attribution-aware multi-LoRA inference node.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: OPENLORA_CONFIG or the user config dir)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"node.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from node.config import load_settings

        # `init` writes the config file, so only it may name one that does not exist yet
        creates_config = getattr(args, "creates_config", False)
        settings = load_settings(args.config, allow_missing=creates_config)
        return int(args.func(args, settings) or 0)
    except _error_families() as exc:
        print(f"openlora: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("openlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
