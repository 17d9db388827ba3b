"""Alembic environment and revisions of the ledger schema (packaged, so `openlora db` works when installed).

`alembic_config(url)` builds the Alembic configuration in code, pointing at this package, so no
alembic.ini has to be found on disk at run time (alembic.ini here is for developers running `alembic`).
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

HERE = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(HERE / "versions"))
    # ConfigParser interpolation would treat '%' in a URL-encoded password as syntax.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["database_url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "-1") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
