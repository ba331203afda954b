"""The VIP list version per tenant (models_sync.VipListVersion) and the triggers that bump it.

PostgreSQL: statement-level triggers with transition tables, so one statement touching many VIPs
bumps each tenant once, in tenant id order (two statements over the same tenants take the version
rows' locks in the same order: no deadlock); values come from a sequence, so they never repeat.
SQLite (the embedded layout): row-level triggers with a random 64-bit value (one writer at a time).
"""

from django.db import migrations, models

PG_FORWARD = """
CREATE SEQUENCE loadbalancing_viplistversion_seq;
CREATE FUNCTION loadbalancing_bump_vip_list_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'tenancy_tenant' THEN
        INSERT INTO loadbalancing_viplistversion (tenant_id, version)
            SELECT id, nextval('loadbalancing_viplistversion_seq') FROM (SELECT DISTINCT id FROM new_rows ORDER BY id) t
            ON CONFLICT (tenant_id) DO UPDATE SET version = excluded.version;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO loadbalancing_viplistversion (tenant_id, version)
            SELECT tenant_id, nextval('loadbalancing_viplistversion_seq')
            FROM (SELECT DISTINCT tenant_id FROM new_rows ORDER BY tenant_id) t
            ON CONFLICT (tenant_id) DO UPDATE SET version = excluded.version;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO loadbalancing_viplistversion (tenant_id, version)
            SELECT tenant_id, nextval('loadbalancing_viplistversion_seq')
            FROM (SELECT DISTINCT tenant_id FROM old_rows ORDER BY tenant_id) t
            ON CONFLICT (tenant_id) DO UPDATE SET version = excluded.version;
    ELSE
        INSERT INTO loadbalancing_viplistversion (tenant_id, version)
            SELECT tenant_id, nextval('loadbalancing_viplistversion_seq')
            FROM (SELECT tenant_id FROM new_rows UNION SELECT tenant_id FROM old_rows ORDER BY tenant_id) t
            ON CONFLICT (tenant_id) DO UPDATE SET version = excluded.version;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER vip_list_version_insert AFTER INSERT ON loadbalancing_vip
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION loadbalancing_bump_vip_list_version();
CREATE TRIGGER vip_list_version_update AFTER UPDATE ON loadbalancing_vip
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION loadbalancing_bump_vip_list_version();
CREATE TRIGGER vip_list_version_delete AFTER DELETE ON loadbalancing_vip
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION loadbalancing_bump_vip_list_version();
CREATE TRIGGER vip_list_version_tenant AFTER UPDATE ON tenancy_tenant
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION loadbalancing_bump_vip_list_version();
"""
PG_REVERSE = """
DROP TRIGGER IF EXISTS vip_list_version_insert ON loadbalancing_vip;
DROP TRIGGER IF EXISTS vip_list_version_update ON loadbalancing_vip;
DROP TRIGGER IF EXISTS vip_list_version_delete ON loadbalancing_vip;
DROP TRIGGER IF EXISTS vip_list_version_tenant ON tenancy_tenant;
DROP FUNCTION IF EXISTS loadbalancing_bump_vip_list_version();
DROP SEQUENCE IF EXISTS loadbalancing_viplistversion_seq;
"""
_SQLITE_BUMP = "INSERT OR REPLACE INTO loadbalancing_viplistversion (tenant_id, version) VALUES ({}, random());"
SQLITE_FORWARD = [
    "CREATE TRIGGER vip_list_version_insert AFTER INSERT ON loadbalancing_vip BEGIN "
    + _SQLITE_BUMP.format("NEW.tenant_id") + " END",
    "CREATE TRIGGER vip_list_version_update AFTER UPDATE ON loadbalancing_vip BEGIN "
    + _SQLITE_BUMP.format("OLD.tenant_id") + " " + _SQLITE_BUMP.format("NEW.tenant_id") + " END",
    "CREATE TRIGGER vip_list_version_delete AFTER DELETE ON loadbalancing_vip BEGIN "
    + _SQLITE_BUMP.format("OLD.tenant_id") + " END",
    "CREATE TRIGGER vip_list_version_tenant AFTER UPDATE ON tenancy_tenant BEGIN "
    + _SQLITE_BUMP.format("NEW.id") + " END",
]
SQLITE_REVERSE = [
    f"DROP TRIGGER IF EXISTS {name}"
    for name in ("vip_list_version_insert", "vip_list_version_update", "vip_list_version_delete",
                 "vip_list_version_tenant")
]


def create_triggers(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FORWARD)
    elif vendor == "sqlite":
        for statement in SQLITE_FORWARD:
            schema_editor.execute(statement)
    else:
        raise RuntimeError(f"VIP list version triggers: no SQL for database vendor {vendor!r}")


def drop_triggers(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_REVERSE)
    elif vendor == "sqlite":
        for statement in SQLITE_REVERSE:
            schema_editor.execute(statement)


class Migration(migrations.Migration):

    dependencies = [
        ("loadbalancing", "0006_listener_backend_cap"),
        ("tenancy", "0002_retired_key"),
    ]

    operations = [
        migrations.CreateModel(
            name="VipListVersion",
            fields=[
                ("tenant_id", models.BigIntegerField(primary_key=True, serialize=False)),
                ("version", models.BigIntegerField()),
            ],
        ),
        migrations.RunPython(create_triggers, drop_triggers),
    ]
