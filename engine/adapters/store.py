"""The disk tier: every PEFT adapter folder directly under one directory, served under its folder name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.adapters.peft_format import CONFIG_FILE, check_name
from engine.errors import AdapterError, AdapterNotFound


@dataclass(frozen=True)
class AdapterStore:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))
        if not self.root.is_dir():
            raise AdapterError(f"adapter store {self.root} is not a directory")

    def names(self) -> list[str]:
        """Folders holding an adapter_config.json whose names are safe; others are skipped, not served."""
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.is_symlink() and (p / CONFIG_FILE).is_file():
                try:
                    out.append(check_name(p.name))
                except AdapterError:
                    continue
        return out

    def path(self, name: str) -> Path:
        check_name(name)  # refuses '..', '/', and anything else that could leave the root
        p = self.root / name
        if not p.is_dir() or p.is_symlink() or not (p / CONFIG_FILE).is_file():
            raise AdapterNotFound(f"no adapter named {name!r} in {self.root}")
        return p

    def __contains__(self, name: str) -> bool:
        try:
            self.path(name)
        except AdapterError:
            return False
        return True

    def register_all(self, cache) -> dict[str, Exception]:
        """Register every adapter with `cache`; returns the refusals by name (the rest are served)."""
        refused: dict[str, Exception] = {}
        for name in self.names():
            try:
                cache.register(name, self.root / name)
            except AdapterError as e:
                refused[name] = e
        return refused
