"""Alembic environment: runs revisions against the URL given by the caller (online mode only)."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from storage.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("LORAFN_DATABASE__URL")
    if not url:
        raise RuntimeError("no database URL: set sqlalchemy.url or LORAFN_DATABASE__URL")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("lorafn migrations run online only")
run_migrations_online()
