"""api keys record their last use; tenants get quota overrides

A tenant's `quota_*` columns override the gateway's defaults (`LORAFN_GATEWAY__QUOTAS__*`) for that tenant;
NULL keeps the default. `api_keys.last_used_at` is written when a gateway looks a key up in Postgres (once
per key, gateway and auth cache lifetime), so it is exact to within a few seconds. Keys are revoked by
setting `revoked_at` (the column exists since 0001).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUOTA_COLUMNS = (
    ("quota_requests_per_s", sa.Float()),
    ("quota_burst", sa.Integer()),
    ("quota_tokens_per_min", sa.BigInteger()),
    ("quota_concurrent", sa.Integer()),
    ("quota_adapters", sa.Integer()),
    ("quota_stored_bytes", sa.BigInteger()),
)


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    for name, type_ in QUOTA_COLUMNS:
        op.add_column("tenants", sa.Column(name, type_, nullable=True))
    positive = " AND ".join(f"({name} IS NULL OR {name} > 0)" for name, _ in QUOTA_COLUMNS)
    op.create_check_constraint(op.f("ck_tenants_quota_positive"), "tenants", positive)


def downgrade() -> None:
    op.drop_constraint(op.f("ck_tenants_quota_positive"), "tenants", type_="check")
    for name, _ in reversed(QUOTA_COLUMNS):
        op.drop_column("tenants", name)
    op.drop_column("api_keys", "last_used_at")
