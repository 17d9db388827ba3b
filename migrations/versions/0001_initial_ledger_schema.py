"""initial ledger schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-22
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('datanets',
    sa.Column('id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('owner', sa.String(length=42), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('metadata_uri', sa.Text(), nullable=False),
    sa.Column('synced_block', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datanets'))
    )
    op.create_table('payee_balances',
    sa.Column('payee', sa.String(length=42), nullable=False),
    sa.Column('credited', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('batched', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.PrimaryKeyConstraint('payee', name=op.f('pk_payee_balances'))
    )
    op.create_table('payers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=42), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payers')),
    sa.UniqueConstraint('address', name=op.f('uq_payers_address'))
    )
    op.create_table('settlement_batches',
    sa.Column('id', sa.String(length=66), nullable=False),
    sa.Column('node_id', sa.BigInteger(), nullable=False),
    sa.Column('merkle_root', sa.String(length=66), nullable=False),
    sa.Column('receipt_count', sa.Integer(), nullable=False),
    sa.Column('total_amount', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('tx_hash', sa.String(length=66), nullable=True),
    sa.Column('block_number', sa.BigInteger(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'submitted', 'confirmed', 'failed')", name=op.f('ck_settlement_batches_status_known')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_settlement_batches'))
    )
    with op.batch_alter_table('settlement_batches', schema=None) as batch_op:
        batch_op.create_index('ix_settlement_batches_status', ['status'], unique=False)

    op.create_table('usage_rollups',
    sa.Column('scope', sa.String(length=8), nullable=False),
    sa.Column('scope_id', sa.BigInteger(), nullable=False),
    sa.Column('hour', sa.DateTime(), nullable=False),
    sa.Column('requests', sa.BigInteger(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.CheckConstraint("scope IN ('adapter', 'datanet', 'payer')", name=op.f('ck_usage_rollups_scope_known')),
    sa.PrimaryKeyConstraint('scope', 'scope_id', 'hour', name=op.f('pk_usage_rollups'))
    )
    op.create_table('adapters',
    sa.Column('id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('owner', sa.String(length=42), nullable=False),
    sa.Column('datanet_id', sa.BigInteger(), nullable=True),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('content_hash', sa.String(length=66), nullable=False),
    sa.Column('price_per_m_input', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('price_per_m_output', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('owner_bps', sa.Integer(), nullable=False),
    sa.Column('contributors_bps', sa.Integer(), nullable=False),
    sa.Column('operator_bps', sa.Integer(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('synced_block', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('owner_bps + contributors_bps + operator_bps = 10000', name=op.f('ck_adapters_split_sums_to_10000')),
    sa.CheckConstraint('owner_bps >= 0 AND contributors_bps >= 0 AND operator_bps >= 0', name=op.f('ck_adapters_split_non_negative')),
    sa.ForeignKeyConstraint(['datanet_id'], ['datanets.id'], name=op.f('fk_adapters_datanet_id_datanets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapters'))
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapters_datanet_id'), ['datanet_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_owner'), ['owner'], unique=False)

    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('payer_id', sa.Integer(), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('label', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['payer_id'], ['payers.id'], name=op.f('fk_api_keys_payer_id_payers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_payer_id'), ['payer_id'], unique=False)

    op.create_table('batch_debits',
    sa.Column('batch_id', sa.String(length=66), nullable=False),
    sa.Column('payer_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('voucher_cumulative_value', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('voucher_timestamp', sa.BigInteger(), nullable=False),
    sa.Column('voucher_signature', sa.String(length=132), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['settlement_batches.id'], name=op.f('fk_batch_debits_batch_id_settlement_batches')),
    sa.ForeignKeyConstraint(['payer_id'], ['payers.id'], name=op.f('fk_batch_debits_payer_id_payers')),
    sa.PrimaryKeyConstraint('batch_id', 'payer_id', name=op.f('pk_batch_debits'))
    )
    op.create_table('batch_payouts',
    sa.Column('batch_id', sa.String(length=66), nullable=False),
    sa.Column('payee', sa.String(length=42), nullable=False),
    sa.Column('amount', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['settlement_batches.id'], name=op.f('fk_batch_payouts_batch_id_settlement_batches')),
    sa.PrimaryKeyConstraint('batch_id', 'payee', name=op.f('pk_batch_payouts'))
    )
    with op.batch_alter_table('batch_payouts', schema=None) as batch_op:
        batch_op.create_index('ix_batch_payouts_payee', ['payee'], unique=False)

    op.create_table('contributors',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('datanet_id', sa.BigInteger(), nullable=False),
    sa.Column('address', sa.String(length=42), nullable=False),
    sa.Column('examples', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['datanet_id'], ['datanets.id'], name=op.f('fk_contributors_datanet_id_datanets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_contributors')),
    sa.UniqueConstraint('datanet_id', 'address', name='uq_contributors_datanet_address')
    )
    with op.batch_alter_table('contributors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_contributors_address'), ['address'], unique=False)

    op.create_table('payer_vouchers',
    sa.Column('payer_id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.BigInteger(), nullable=False),
    sa.Column('cumulative_value', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('timestamp', sa.BigInteger(), nullable=False),
    sa.Column('signature', sa.String(length=132), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['payer_id'], ['payers.id'], name=op.f('fk_payer_vouchers_payer_id_payers')),
    sa.PrimaryKeyConstraint('payer_id', 'node_id', name=op.f('pk_payer_vouchers'))
    )
    op.create_table('requests',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('payer_id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.BigInteger(), nullable=False),
    sa.Column('adapter_mix', sa.Text(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('first_token_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=False),
    sa.Column('price_per_m_input', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('price_per_m_output', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('cost', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('content_hash', sa.String(length=66), nullable=False),
    sa.CheckConstraint("status IN ('completed', 'failed', 'cancelled')", name=op.f('ck_requests_status_known')),
    sa.CheckConstraint('prompt_tokens >= 0 AND completion_tokens >= 0', name=op.f('ck_requests_tokens_non_negative')),
    sa.ForeignKeyConstraint(['payer_id'], ['payers.id'], name=op.f('fk_requests_payer_id_payers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_requests'))
    )
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.create_index('ix_requests_finished', ['finished_at'], unique=False)
        batch_op.create_index('ix_requests_payer_finished', ['payer_id', 'finished_at'], unique=False)

    op.create_table('adapter_usage',
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('adapter_id', sa.BigInteger(), nullable=False),
    sa.Column('datanet_id', sa.BigInteger(), nullable=True),
    sa.Column('weight_bps', sa.Integer(), nullable=False),
    sa.Column('cost_share', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_adapter_usage_adapter_id_adapters')),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], name=op.f('fk_adapter_usage_request_id_requests')),
    sa.PrimaryKeyConstraint('request_id', 'adapter_id', name=op.f('pk_adapter_usage'))
    )
    with op.batch_alter_table('adapter_usage', schema=None) as batch_op:
        batch_op.create_index('ix_adapter_usage_adapter_finished', ['adapter_id', 'finished_at'], unique=False)
        batch_op.create_index('ix_adapter_usage_datanet_finished', ['datanet_id', 'finished_at'], unique=False)

    op.create_table('contributor_influence',
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('adapter_id', sa.BigInteger(), nullable=False),
    sa.Column('contributor_id', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('share_bps', sa.Integer(), nullable=False),
    sa.CheckConstraint('share_bps >= 0 AND share_bps <= 10000', name=op.f('ck_contributor_influence_share_in_range')),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_contributor_influence_adapter_id_adapters')),
    sa.ForeignKeyConstraint(['contributor_id'], ['contributors.id'], name=op.f('fk_contributor_influence_contributor_id_contributors')),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], name=op.f('fk_contributor_influence_request_id_requests')),
    sa.PrimaryKeyConstraint('request_id', 'adapter_id', 'contributor_id', name=op.f('pk_contributor_influence'))
    )
    with op.batch_alter_table('contributor_influence', schema=None) as batch_op:
        batch_op.create_index('ix_contributor_influence_contributor', ['contributor_id', 'request_id'], unique=False)

    op.create_table('receipts',
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('digest', sa.String(length=66), nullable=False),
    sa.Column('request_hash', sa.String(length=66), nullable=False),
    sa.Column('payer', sa.String(length=42), nullable=False),
    sa.Column('node_id', sa.BigInteger(), nullable=False),
    sa.Column('adapter_ids', sa.Text(), nullable=False),
    sa.Column('input_tokens', sa.BigInteger(), nullable=False),
    sa.Column('output_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.Column('attribution_digest', sa.String(length=66), nullable=False),
    sa.Column('timestamp', sa.BigInteger(), nullable=False),
    sa.Column('chain_id', sa.BigInteger(), nullable=False),
    sa.Column('verifying_contract', sa.String(length=42), nullable=False),
    sa.Column('signer', sa.String(length=42), nullable=False),
    sa.Column('signature', sa.String(length=132), nullable=False),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], name=op.f('fk_receipts_request_id_requests')),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_receipts')),
    sa.UniqueConstraint('digest', name=op.f('uq_receipts_digest'))
    )
    with op.batch_alter_table('receipts', schema=None) as batch_op:
        batch_op.create_index('ix_receipts_payer_timestamp', ['payer', 'timestamp'], unique=False)

    op.create_table('request_credits',
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('payee', sa.String(length=42), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('adapter_id', sa.BigInteger(), nullable=False),
    sa.Column('amount', sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite"), nullable=False),
    sa.CheckConstraint("role IN ('owner', 'contributor', 'operator')", name=op.f('ck_request_credits_role_known')),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], name=op.f('fk_request_credits_request_id_requests')),
    sa.PrimaryKeyConstraint('request_id', 'payee', 'role', 'adapter_id', name=op.f('pk_request_credits'))
    )
    with op.batch_alter_table('request_credits', schema=None) as batch_op:
        batch_op.create_index('ix_request_credits_payee_request', ['payee', 'request_id'], unique=False)

    op.create_table('batch_receipts',
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('batch_id', sa.String(length=66), nullable=False),
    sa.Column('leaf_index', sa.Integer(), nullable=False),
    sa.Column('leaf', sa.String(length=66), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['settlement_batches.id'], name=op.f('fk_batch_receipts_batch_id_settlement_batches')),
    sa.ForeignKeyConstraint(['request_id'], ['receipts.request_id'], name=op.f('fk_batch_receipts_request_id_receipts')),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_batch_receipts')),
    sa.UniqueConstraint('batch_id', 'leaf_index', name='uq_batch_receipts_batch_leaf')
    )


def downgrade() -> None:
    op.drop_table('batch_receipts')
    with op.batch_alter_table('request_credits', schema=None) as batch_op:
        batch_op.drop_index('ix_request_credits_payee_request')

    op.drop_table('request_credits')
    with op.batch_alter_table('receipts', schema=None) as batch_op:
        batch_op.drop_index('ix_receipts_payer_timestamp')

    op.drop_table('receipts')
    with op.batch_alter_table('contributor_influence', schema=None) as batch_op:
        batch_op.drop_index('ix_contributor_influence_contributor')

    op.drop_table('contributor_influence')
    with op.batch_alter_table('adapter_usage', schema=None) as batch_op:
        batch_op.drop_index('ix_adapter_usage_datanet_finished')
        batch_op.drop_index('ix_adapter_usage_adapter_finished')

    op.drop_table('adapter_usage')
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_index('ix_requests_payer_finished')
        batch_op.drop_index('ix_requests_finished')

    op.drop_table('requests')
    op.drop_table('payer_vouchers')
    with op.batch_alter_table('contributors', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_contributors_address'))

    op.drop_table('contributors')
    with op.batch_alter_table('batch_payouts', schema=None) as batch_op:
        batch_op.drop_index('ix_batch_payouts_payee')

    op.drop_table('batch_payouts')
    op.drop_table('batch_debits')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_payer_id'))

    op.drop_table('api_keys')
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapters_owner'))
        batch_op.drop_index(batch_op.f('ix_adapters_datanet_id'))

    op.drop_table('adapters')
    op.drop_table('usage_rollups')
    with op.batch_alter_table('settlement_batches', schema=None) as batch_op:
        batch_op.drop_index('ix_settlement_batches_status')

    op.drop_table('settlement_batches')
    op.drop_table('payers')
    op.drop_table('payee_balances')
    op.drop_table('datanets')
