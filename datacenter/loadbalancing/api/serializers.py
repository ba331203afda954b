"""Serializers for the load-balancing API. They shape data; the rules live in services.py."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from datacenter.api.serializers import BaseModelSerializer, url_field
from datacenter.tenancy.scoping import restrict, tenants_for

from ..choices import (
    BACKEND_CAP_MAX,
    BACKEND_CAP_MIN,
    BACKEND_CAP_RANGE,
    BACKEND_WEIGHT_MAX,
    BACKEND_WEIGHT_MIN,
    FLOW_IDLE_TIMEOUT_MAX_S,
    FLOW_IDLE_TIMEOUT_MIN_S,
    FLOW_IDLE_TIMEOUT_RANGE,
    PORT_MAX,
    PORT_MIN,
    BackendState,
)
from ..models import AgentNode, Backend, Generation, Listener, Vip, VipPool


class ScopedPrimaryKeyField(serializers.PrimaryKeyRelatedField):
    """A foreign key whose choices are limited to what the caller can see (others: 'does not exist')."""

    def __init__(self, *, scope, **kwargs):
        self.scope = scope  # callable(user) -> queryset
        super().__init__(**kwargs)

    def get_queryset(self):
        request = self.context.get("request")
        user = getattr(request, "user", None)
        return self.scope(user)


class VipPoolSerializer(BaseModelSerializer):
    url = url_field("loadbalancing-api:vippool-detail")

    class Meta:
        model = VipPool
        fields = [
            "id",
            "url",
            "display",
            "name",
            "prefix",
            "shared",
            "tenants",
            "description",
            "created",
            "updated",
        ]


class VipSerializer(BaseModelSerializer):
    url = url_field("loadbalancing-api:vip-detail")
    tenant = ScopedPrimaryKeyField(scope=tenants_for, help_text="Fixed at creation.")
    pool = serializers.PrimaryKeyRelatedField(
        queryset=VipPool.objects.all(),
        required=False,
        allow_null=True,
        help_text="Pool to allocate from; default: the tenant's first allowed pool. Fixed at creation.",
    )
    address = serializers.IPAddressField(
        required=False,
        allow_null=True,
        help_text="Requested address (must be inside an allowed pool); omit to allocate. Fixed at creation.",
    )

    class Meta:
        model = Vip
        fields = [
            "id",
            "url",
            "display",
            "tenant",
            "pool",
            "name",
            "address",
            "description",
            "provisioning_status",
            "operating_status",
            "created",
            "updated",
        ]
        read_only_fields = ["provisioning_status", "operating_status"]
        validators: list = []  # uniqueness is checked by services.create_vip with a clearer message


class HealthCheckSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["tcp", "http"], default="tcp")
    path = serializers.CharField(required=False, allow_null=True)
    interval_s = serializers.IntegerField(required=False, min_value=1, max_value=300)
    timeout_s = serializers.IntegerField(required=False, min_value=1, max_value=60)
    rise = serializers.IntegerField(required=False, min_value=1, max_value=10)
    fall = serializers.IntegerField(required=False, min_value=1, max_value=10)


class ListenerSerializer(BaseModelSerializer):
    url = url_field("loadbalancing-api:listener-detail")
    vip = ScopedPrimaryKeyField(
        scope=lambda user: restrict(Vip.objects.all(), user), help_text="Fixed at creation."
    )
    health_check = HealthCheckSerializer(required=False, allow_null=True)
    flow_idle_timeout_s = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=FLOW_IDLE_TIMEOUT_MIN_S,
        max_value=FLOW_IDLE_TIMEOUT_MAX_S,
        error_messages={
            key: f"Not a flow idle timeout: {FLOW_IDLE_TIMEOUT_RANGE}."
            for key in ("invalid", "min_value", "max_value", "max_string_length")
        },
        help_text=(
            f"Seconds a flow may stay idle before the muxes forget it ({FLOW_IDLE_TIMEOUT_MIN_S} to "
            f"{FLOW_IDLE_TIMEOUT_MAX_S}); null: the agents' default, TCP 7440, UDP 120."
        ),
    )

    backend_cap = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=BACKEND_CAP_MIN,
        max_value=BACKEND_CAP_MAX,
        error_messages={
            key: f"Not a backend cap: {BACKEND_CAP_RANGE}."
            for key in ("invalid", "min_value", "max_value", "max_string_length")
        },
        help_text=(
            f"Most backends this listener may get ({BACKEND_CAP_MIN} to {BACKEND_CAP_MAX}); the muxes size "
            "its table to the smallest prime above 100 x the cap (6,421 buckets for 64), at most the "
            "cluster's table size. Null: the cluster's table size."
        ),
    )

    class Meta:
        model = Listener
        fields = [
            "id",
            "url",
            "display",
            "vip",
            "name",
            "protocol",
            "port",
            "drain_timeout_s",
            "fast_path",
            "health_check",
            "flow_idle_timeout_s",
            "backend_cap",
            "generation",
            "provisioning_status",
            "operating_status",
            "created",
            "updated",
        ]
        read_only_fields = ["generation", "provisioning_status", "operating_status"]
        validators: list = []


class HostNameField(serializers.CharField):
    """A backend's host by name (null: none); services check the host is usable by the tenant."""

    def to_representation(self, value) -> str:
        return value.name


class BackendSerializer(BaseModelSerializer):
    url = url_field("loadbalancing-api:backend-detail")
    listener = ScopedPrimaryKeyField(
        scope=lambda user: restrict(Listener.objects.all(), user, "vip__tenant"),
        help_text="Fixed at creation.",
    )
    address = serializers.IPAddressField()
    port = serializers.IntegerField(min_value=PORT_MIN, max_value=PORT_MAX)
    weight = serializers.IntegerField(min_value=BACKEND_WEIGHT_MIN, max_value=BACKEND_WEIGHT_MAX, default=1)
    host = HostNameField(required=False, allow_null=True, max_length=100)

    class Meta:
        model = Backend
        fields = [
            "id",
            "url",
            "display",
            "listener",
            "position",
            "address",
            "port",
            "weight",
            "admin_state",
            "host",
            "created",
            "updated",
        ]
        read_only_fields = ["position"]
        validators: list = []


class BackendItemSerializer(serializers.Serializer):
    """One entry of a declarative backend list (PUT /api/listeners/{id}/backends/)."""

    address = serializers.IPAddressField()
    port = serializers.IntegerField(min_value=PORT_MIN, max_value=PORT_MAX)
    weight = serializers.IntegerField(min_value=BACKEND_WEIGHT_MIN, max_value=BACKEND_WEIGHT_MAX, default=1)
    admin_state = serializers.ChoiceField(choices=BackendState.choices, default=BackendState.ACTIVE)
    host = serializers.CharField(
        required=False,
        allow_null=True,
        max_length=100,
        help_text="Name of a host of this tenant (or a shared host).",
    )


@extend_schema_field(BackendItemSerializer(many=True))
class BackendItemsField(serializers.ListField):
    """Entries stay plain dicts here: services.validate_backend_list checks them and names each
    error by position ("backends[2].port"); the schema still documents them as BackendItem."""

    child = serializers.DictField()


class BackendListSerializer(serializers.Serializer):
    """Request body of PUT /api/listeners/{id}/backends/."""

    backends = BackendItemsField(allow_empty=True, help_text="The complete ordered list.")
    expected_generation = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=0,
        help_text="The generation you last saw; a different current generation answers 409.",
    )


class BackendDiffSerializer(serializers.Serializer):
    added = serializers.ListField(child=serializers.DictField())
    removed = serializers.ListField(child=serializers.DictField())
    changed = serializers.ListField(child=serializers.DictField())
    reordered = serializers.BooleanField()


class BackendListStateSerializer(serializers.Serializer):
    """Response of GET and PUT /api/listeners/{id}/backends/."""

    listener = serializers.IntegerField()
    generation = serializers.IntegerField()
    backends = BackendItemSerializer(many=True)
    dry_run = serializers.BooleanField(required=False)
    changed = serializers.BooleanField(required=False)
    diff = BackendDiffSerializer(required=False)
    bucket_movement = serializers.DictField(
        required=False,
        help_text="dry run only: share of buckets (new flows) that would move, per-backend shares",
    )


class GenerationSerializer(BaseModelSerializer):
    url = url_field("loadbalancing-api:generation-detail")

    class Meta:
        model = Generation
        fields = [
            "id",
            "url",
            "display",
            "listener",
            "number",
            "backends",
            "changes",
            "author_name",
            "request_id",
            "created",
        ]
        read_only_fields = fields


class AgentConnectionSerializer(serializers.Serializer):
    """The agent's control connection as the portal sees it (models_sync.AgentSync)."""

    connected = serializers.BooleanField()
    epoch = serializers.IntegerField(help_text="Bumped by every hello; older connections' acks are ignored.")
    connected_at = serializers.DateTimeField(allow_null=True)
    disconnected_at = serializers.DateTimeField(allow_null=True)
    disconnect_reason = serializers.CharField(help_text="Why the last connection ended ('' while connected).")
    missed_notifications = serializers.IntegerField(
        help_text="Changes whose notification the channel layer dropped; each was repaired by a resync."
    )
    lag_resends = serializers.IntegerField(help_text="Full states re-sent because acknowledgements lagged.")
    stale_acks_ignored = serializers.IntegerField(help_text="Late acknowledgements of replaced connections.")
    error = serializers.CharField(help_text="Why the last apply failed ('' after a success).")


class AgentNodeSerializer(BaseModelSerializer):
    url = url_field("loadbalancing-api:agentnode-detail")
    connection = serializers.SerializerMethodField()

    @extend_schema_field(AgentConnectionSerializer(allow_null=True))
    def get_connection(self, node: AgentNode) -> dict | None:
        sync = getattr(node, "sync", None)  # None until the agent's first hello
        return None if sync is None else AgentConnectionSerializer(sync).data

    class Meta:
        model = AgentNode
        fields = [
            "id",
            "url",
            "display",
            "name",
            "host",
            "role",
            "address",
            "peer_port",
            "enabled",
            "last_seen",
            "applied_generation",
            "applied_at",
            "last_stats",
            "connection",
            "created",
            "updated",
        ]
        read_only_fields = ["last_seen", "applied_generation", "applied_at", "last_stats", "connection"]


class AgentNodeWithTokenSerializer(AgentNodeSerializer):
    token = serializers.CharField(read_only=True, help_text="The agent's token; shown only in this response.")

    class Meta(AgentNodeSerializer.Meta):
        fields = [*AgentNodeSerializer.Meta.fields, "token"]


class _Row:
    """A VIP list row from `.values()` with what `Vip.__str__` and the url field read (pk, name,
    address): no model instance, no field descriptors."""

    __slots__ = ("address", "name", "pk")

    def __init__(self, pk: int, name: str, address: str) -> None:
        self.pk, self.name, self.address = pk, name, address

    __str__ = Vip.__str__


VIP_LIST_COLUMNS = (
    "id",
    "tenant_id",
    "pool_id",
    "name",
    "address",
    "description",
    "provisioning_status",
    "operating_status",
    "created",
    "updated",
)


# The serializer's fields, in order, that vip_list_items renders (a field added to VipSerializer
# and not there sends the list back through the serializer: views.VipViewSet.list checks).
VIP_LIST_FIELDS = [
    "id",
    "url",
    "display",
    "tenant",
    "pool",
    "name",
    "address",
    "description",
    "provisioning_status",
    "operating_status",
    "created",
    "updated",
]


def vip_list_items(rows, serializer: VipSerializer) -> list[dict]:
    """What `VipSerializer(many=True)` gives for these VIPs, from `.values(*VIP_LIST_COLUMNS)` rows.

    The VIP list is 60 % of a tenant client's calls (issue 15); building a model instance and
    walking eleven DRF fields per VIP was most of its CPU time. The url and the timestamps still
    go through the serializer's own fields, so their format cannot drift; the rest are the
    columns' values, which is what DRF's CharField/IPAddressField (str of a str) and
    PrimaryKeyRelatedField (the id) return. The body is byte for byte the serializer's:
    test_list_and_detail_bodies_are_byte_for_byte_what_stock_drf_fields_give compares them.
    """
    fields = serializer.fields
    url, created, updated = fields["url"], fields["created"], fields["updated"]
    items = []
    for row in rows:
        vip = _Row(row["id"], row["name"], row["address"])
        items.append(
            {
                "id": row["id"],
                "url": url.to_representation(vip),
                "display": str(vip),
                "tenant": row["tenant_id"],
                "pool": row["pool_id"],
                "name": row["name"],
                "address": row["address"],
                "description": row["description"],
                "provisioning_status": row["provisioning_status"],
                "operating_status": row["operating_status"],
                "created": created.to_representation(row["created"]),
                "updated": updated.to_representation(row["updated"]),
            }
        )
    return items
