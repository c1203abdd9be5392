"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 15:17:42.993389
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('tenants',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("name ~ '^[A-Za-z0-9_-]{1,64}$'", name=op.f('ck_tenants_name_token')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
    sa.UniqueConstraint('name', name=op.f('uq_tenants_name'))
    )
    op.create_table('workers',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('host', sa.String(length=256), nullable=False),
    sa.Column('device', sa.String(length=64), nullable=False),
    sa.Column('capacity', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='pool pages, page bytes, host cache bytes, ...'),
    sa.Column('state', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='last heartbeat body'),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_table('adapters',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('current_version_id', sa.UUID(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("name ~ '^[A-Za-z0-9_-]{1,64}$'", name=op.f('ck_adapters_name_token')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_adapters_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapters')),
    sa.UniqueConstraint('tenant_id', 'name', name=op.f('uq_adapters_tenant_id_name'))
    )
    op.create_table('api_keys',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('prefix', name=op.f('uq_api_keys_prefix'))
    )
    op.create_index(op.f('ix_api_keys_tenant_id'), 'api_keys', ['tenant_id'], unique=False)
    op.create_table('adapter_versions',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('adapter_id', sa.UUID(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('max_rank', sa.Integer(), nullable=False),
    sa.Column('ranks', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment="rank per adapted module: {'layers.3.q_proj': 8}"),
    sa.Column('lora_alpha', sa.Float(), nullable=False),
    sa.Column('use_rslora', sa.Boolean(), nullable=False),
    sa.Column('target_modules', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('num_layers', sa.Integer(), nullable=False, comment='number of backbone layers adapted'),
    sa.Column('base_model', sa.String(length=256), nullable=True),
    sa.Column('dtype', sa.String(length=8), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('object_key', sa.String(length=256), nullable=False),
    sa.Column('status', sa.Enum('ready', 'disabled', name='version_status'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name=op.f('ck_adapter_versions_sha256_hex')),
    sa.CheckConstraint('max_rank >= 1', name=op.f('ck_adapter_versions_rank_positive')),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_adapter_versions_adapter_id_adapters'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_versions')),
    sa.UniqueConstraint('adapter_id', 'sha256', name=op.f('uq_adapter_versions_adapter_id_sha256'))
    )
    op.create_index(op.f('ix_adapter_versions_adapter_id'), 'adapter_versions', ['adapter_id'], unique=False)
    op.create_index(op.f('ix_adapter_versions_sha256'), 'adapter_versions', ['sha256'], unique=False)
    # adapters and adapter_versions refer to each other: this key is added once both tables exist.
    op.create_foreign_key(op.f('fk_adapters_current_version_id_adapter_versions'), 'adapters', 'adapter_versions',
                          ['current_version_id'], ['id'], ondelete='SET NULL')
    op.create_table('demand_history',
    sa.Column('adapter_id', sa.UUID(), nullable=False),
    sa.Column('bucket_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('bucket_seconds', sa.Integer(), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_demand_history_adapter_id_adapters'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('adapter_id', 'bucket_start', 'bucket_seconds', name=op.f('pk_demand_history'))
    )
    op.create_table('invocations',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('adapter_id', sa.UUID(), nullable=True),
    sa.Column('adapter_version_id', sa.UUID(), nullable=True),
    sa.Column('status', sa.Enum('queued', 'running', 'succeeded', 'failed', name='invocation_status'), nullable=False),
    sa.Column('idempotency_key', sa.String(length=256), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('submitted_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('first_token_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('worker_id', sa.String(length=64), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_invocations_adapter_id_adapters'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['adapter_version_id'], ['adapter_versions.id'], name=op.f('fk_invocations_adapter_version_id_adapter_versions'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_invocations_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invocations')),
    sa.UniqueConstraint('tenant_id', 'idempotency_key', name=op.f('uq_invocations_tenant_id_idempotency_key'))
    )
    op.create_index(op.f('ix_invocations_status_submitted_at'), 'invocations', ['status', 'submitted_at'], unique=False)
    op.create_index(op.f('ix_invocations_tenant_id'), 'invocations', ['tenant_id'], unique=False)
    op.create_table('residency',
    sa.Column('adapter_version_id', sa.UUID(), nullable=False),
    sa.Column('worker_id', sa.String(length=64), nullable=False),
    sa.Column('tier', sa.Enum('host', 'device', name='tier'), nullable=False),
    sa.Column('pages', sa.Integer(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('load_ms', sa.Float(), nullable=True),
    sa.Column('loaded_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['adapter_version_id'], ['adapter_versions.id'], name=op.f('fk_residency_adapter_version_id_adapter_versions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], name=op.f('fk_residency_worker_id_workers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('adapter_version_id', 'worker_id', 'tier', name=op.f('pk_residency'))
    )
    op.create_index(op.f('ix_residency_worker_id_tier'), 'residency', ['worker_id', 'tier'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_residency_worker_id_tier'), table_name='residency')
    op.drop_table('residency')
    op.drop_index(op.f('ix_invocations_tenant_id'), table_name='invocations')
    op.drop_index(op.f('ix_invocations_status_submitted_at'), table_name='invocations')
    op.drop_table('invocations')
    op.drop_table('demand_history')
    op.drop_constraint(op.f('fk_adapters_current_version_id_adapter_versions'), 'adapters', type_='foreignkey')
    op.drop_index(op.f('ix_adapter_versions_sha256'), table_name='adapter_versions')
    op.drop_index(op.f('ix_adapter_versions_adapter_id'), table_name='adapter_versions')
    op.drop_table('adapter_versions')
    op.drop_index(op.f('ix_api_keys_tenant_id'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('adapters')
    op.drop_table('workers')
    op.drop_table('tenants')
    for enum_name in ('tier', 'invocation_status', 'version_status'):
        sa.Enum(name=enum_name).drop(op.get_bind(), checkfirst=True)
