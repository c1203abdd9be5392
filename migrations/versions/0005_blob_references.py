"""blob references (one transaction decides a blob's life)

A row per blob in the object store, by content hash. Every version refers to its blob's row (foreign key),
and the row's lock orders the two decisions about a blob: a push registers a version of it only while
holding the lock and after checking that the object is there, and a removal deletes the object only while
holding the lock and while no version refers to it (storage.registry). Existing blobs get their rows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'blobs',
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name=op.f('ck_blobs_sha256_hex')),
        sa.PrimaryKeyConstraint('sha256', name=op.f('pk_blobs')),
    )
    op.execute("INSERT INTO blobs (sha256) SELECT DISTINCT sha256 FROM adapter_versions")
    op.create_foreign_key(op.f('fk_adapter_versions_sha256_blobs'), 'adapter_versions', 'blobs', ['sha256'],
                          ['sha256'])


def downgrade() -> None:
    op.drop_constraint(op.f('fk_adapter_versions_sha256_blobs'), 'adapter_versions', type_='foreignkey')
    op.drop_table('blobs')
