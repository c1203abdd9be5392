"""per-tenant NATS credentials: nats_credentials (hashed secrets checked by the NATS auth callout)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('nats_credentials',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_nats_credentials_tenant_id_tenants'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nats_credentials')),
    sa.UniqueConstraint('prefix', name=op.f('uq_nats_credentials_prefix'))
    )
    op.create_index(op.f('ix_nats_credentials_tenant_id'), 'nats_credentials', ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_nats_credentials_tenant_id'), table_name='nats_credentials')
    op.drop_table('nats_credentials')
