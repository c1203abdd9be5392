"""Alembic environment and revisions of the lorafn schema (storage/models.py)."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
