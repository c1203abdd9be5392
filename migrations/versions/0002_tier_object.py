"""the tier enum gains 'object' (one Tier for the whole project: protocol.messages.Tier)

The residency table never stores 'object' (the object store holds every version); the value exists so that
the column's type is the project's one Tier enum.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE tier ADD VALUE IF NOT EXISTS 'object'")


def downgrade() -> None:
    # Postgres cannot drop an enum value: rebuild the type with the two values the column holds.
    op.execute("DELETE FROM residency WHERE tier = 'object'")
    op.execute("ALTER TYPE tier RENAME TO tier_old")
    op.execute("CREATE TYPE tier AS ENUM ('host', 'device')")
    op.execute("ALTER TABLE residency ALTER COLUMN tier TYPE tier USING tier::text::tier")
    op.execute("DROP TYPE tier_old")
