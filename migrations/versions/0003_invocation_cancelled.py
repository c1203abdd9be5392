"""invocations can be cancelled: the invocation_status enum gains 'cancelled'

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 12:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE invocation_status ADD VALUE IF NOT EXISTS 'cancelled'")


def downgrade() -> None:
    # Postgres cannot drop an enum value: cancelled rows become failed, then the type is rebuilt without it.
    op.execute("UPDATE invocations SET status = 'failed', error = coalesce(error, 'cancelled: cancelled') "
               "WHERE status = 'cancelled'")
    op.execute("ALTER TYPE invocation_status RENAME TO invocation_status_old")
    op.execute("CREATE TYPE invocation_status AS ENUM ('queued', 'running', 'succeeded', 'failed')")
    op.execute("ALTER TABLE invocations ALTER COLUMN status DROP DEFAULT")
    op.execute("ALTER TABLE invocations ALTER COLUMN status TYPE invocation_status "
               "USING status::text::invocation_status")
    op.execute("DROP TYPE invocation_status_old")
