"""Run the Alembic migrations of migrations/ programmatically (launcher, tests, `lorafn migrate`)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from migrations import MIGRATIONS_DIR


def alembic_config(database_url: str) -> Config:
    """An Alembic Config for our migrations against `database_url`."""
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema up to `revision` (idempotent)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Take the schema down to `revision`."""
    command.downgrade(alembic_config(database_url), revision)
