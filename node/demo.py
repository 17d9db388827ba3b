"""`make demo`: the main job end to end on the embedded default model, narrated step by step.

Each step is the real thing; steps whose features have not landed yet are not faked.
"""

from __future__ import annotations

import sys

from node import models
from node.config import DEFAULT_MODEL, load_settings


def say(step: str) -> None:
    print(f"\n==> {step}", flush=True)


def main() -> int:
    settings = load_settings()
    say(f"Pulling the embedded default model ({DEFAULT_MODEL}) into {settings.models_dir}")
    path = models.pull(DEFAULT_MODEL, settings.models_dir)
    print(f"    ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
