"""VIP pools, VIPs, listeners, backends, their immutable generations, and the agents applying them."""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from datacenter.inventory.models import Host
from datacenter.tenancy.models import Tenant, hash_token_key

from .choices import (
    BACKEND_CAP_MAX,
    BACKEND_CAP_MIN,
    BACKEND_WEIGHT_MAX,
    BACKEND_WEIGHT_MIN,
    DRAIN_TIMEOUT_MAX_S,
    FLOW_IDLE_TIMEOUT_MAX_S,
    FLOW_IDLE_TIMEOUT_MIN_S,
    PORT_MAX,
    PORT_MIN,
    AgentRole,
    BackendState,
    OperatingStatus,
    Protocol,
    ProvisioningStatus,
)

AGENT_TOKEN_PREFIX = "dca_"  # noqa: S105 - public key prefix, not a secret
AGENT_TOKEN_LOOKUP_CHARS = 8


def validate_prefix(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not a network prefix like 203.0.113.0/24 ({exc}).") from exc


port_validators = [MinValueValidator(PORT_MIN), MaxValueValidator(PORT_MAX)]


class VipPool(models.Model):
    """An operator-defined address range VIPs are allocated from.

    A pool is usable by a tenant when it is `shared` or the tenant is listed in `tenants`.
    """

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=64, unique=True, validators=[validate_prefix])
    shared = models.BooleanField(default=False)
    tenants = models.ManyToManyField(Tenant, blank=True, related_name="vip_pools")
    description = models.CharField(max_length=200, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "VIP pool"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.prefix)

    def contains(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return ip.version == self.network.version and ip in self.network


class Vip(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="vips")
    pool = models.ForeignKey(VipPool, on_delete=models.PROTECT, related_name="vips")
    name = models.CharField(max_length=100)
    address = models.GenericIPAddressField(unique=True, unpack_ipv4=True)
    description = models.CharField(max_length=200, blank=True)
    provisioning_status = models.CharField(
        max_length=16, choices=ProvisioningStatus.choices, default=ProvisioningStatus.PENDING_CREATE
    )
    operating_status = models.CharField(
        max_length=16, choices=OperatingStatus.choices, default=OperatingStatus.OFFLINE
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant__name", "name"]
        verbose_name = "VIP"
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="vip_unique_tenant_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.address})"


class Listener(models.Model):
    """(VIP, protocol, port) with its ordered backend list; `generation` is the current snapshot."""

    vip = models.ForeignKey(Vip, on_delete=models.CASCADE, related_name="listeners")
    name = models.CharField(max_length=100, blank=True)
    protocol = models.CharField(max_length=8, choices=Protocol.choices, default=Protocol.TCP)
    port = models.PositiveIntegerField(validators=port_validators)
    drain_timeout_s = models.PositiveIntegerField(
        default=30, validators=[MaxValueValidator(DRAIN_TIMEOUT_MAX_S)]
    )
    fast_path = models.BooleanField(default=False)
    # null: the agents' default for the protocol (TCP 7,440 s, UDP 120 s)
    flow_idle_timeout_s = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(FLOW_IDLE_TIMEOUT_MIN_S), MaxValueValidator(FLOW_IDLE_TIMEOUT_MAX_S)],
        help_text="Seconds a flow may stay idle before the muxes forget it; empty: TCP 7,440, UDP 120.",
    )
    # null: the cluster's table size; else the agents size this listener's Maglev table (and
    # kernel map) to the smallest prime above 100 x the cap, and refuse more backends than it.
    backend_cap = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(BACKEND_CAP_MIN), MaxValueValidator(BACKEND_CAP_MAX)],
        help_text="Most backends this listener may get; sizes its table (a prime above 100 x the cap). "
        "Empty: the cluster's table size.",
    )
    # null, or {"kind": "tcp"|"http", "path": "/", "interval_s", "timeout_s", "rise", "fall"}
    health_check = models.JSONField(null=True, blank=True)
    generation = models.PositiveIntegerField(default=0, editable=False)
    provisioning_status = models.CharField(
        max_length=16, choices=ProvisioningStatus.choices, default=ProvisioningStatus.PENDING_CREATE
    )
    operating_status = models.CharField(
        max_length=16, choices=OperatingStatus.choices, default=OperatingStatus.OFFLINE
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["vip_id", "protocol", "port"]
        constraints = [
            models.UniqueConstraint(
                fields=["vip", "protocol", "port"], name="listener_unique_vip_protocol_port"
            )
        ]

    def __str__(self) -> str:
        return f"{self.vip.address}:{self.port}/{self.protocol}"

    @property
    def tenant_id(self) -> int:
        return self.vip.tenant_id


class Backend(models.Model):
    """One entry of a listener's backend list; only `services.replace_backends` writes these."""

    listener = models.ForeignKey(Listener, on_delete=models.CASCADE, related_name="backends")
    position = models.PositiveIntegerField(default=0)
    address = models.GenericIPAddressField(unpack_ipv4=True)
    port = models.PositiveIntegerField(validators=port_validators)
    weight = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(BACKEND_WEIGHT_MIN), MaxValueValidator(BACKEND_WEIGHT_MAX)]
    )
    host = models.ForeignKey(Host, on_delete=models.PROTECT, null=True, blank=True, related_name="backends")
    admin_state = models.CharField(max_length=16, choices=BackendState.choices, default=BackendState.ACTIVE)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["listener_id", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["listener", "address", "port"], name="backend_unique_listener_address_port"
            )
        ]

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


class ImmutableError(Exception):
    """Raised when code tries to change a record that is history (generations, audit, events)."""


class Generation(models.Model):
    """Immutable numbered snapshot of a listener's ordered backend list; every change makes one.

    `backends`: [{"address", "port", "weight", "admin_state", "host"}] in list order
    (`host` is the host's name or null). `changes`: {"added": [...], "removed": [...],
    "changed": [{"before", "after"}]} relative to the previous generation.
    """

    listener = models.ForeignKey(Listener, on_delete=models.CASCADE, related_name="generations")
    number = models.PositiveIntegerField()
    backends = models.JSONField(default=list)
    changes = models.JSONField(default=dict)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    author_name = models.CharField(max_length=150, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["listener_id", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["listener", "number"], name="generation_unique_listener_number")
        ]

    def __str__(self) -> str:
        return f"listener {self.listener_id} generation {self.number}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ImmutableError(f"Generation {self.number} of listener {self.listener_id} is immutable.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ImmutableError(f"Generation {self.number} of listener {self.listener_id} is immutable.")


class AgentNode(models.Model):
    """An lbagent instance (a mux or a host agent) that connects to the portal with its own token."""

    name = models.CharField(max_length=100, unique=True)
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="agent_nodes")
    role = models.CharField(max_length=8, choices=AgentRole.choices, default=AgentRole.MUX)
    address = models.GenericIPAddressField(
        null=True, blank=True, unpack_ipv4=True, help_text="Data/peer address of a mux."
    )
    peer_port = models.PositiveIntegerField(default=4790, validators=port_validators)
    enabled = models.BooleanField(default=True)
    token_lookup = models.CharField(max_length=AGENT_TOKEN_LOOKUP_CHARS, blank=True, editable=False)
    token_hash = models.CharField(max_length=64, blank=True, editable=False, db_index=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    applied_generation = models.BigIntegerField(null=True, blank=True)
    applied_at = models.DateTimeField(null=True, blank=True)
    last_stats = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "agent node"

    def __str__(self) -> str:
        return f"{self.name} ({self.role})"

    def set_new_token(self) -> str:
        """Give the agent a new token; returns the key (shown once). The caller saves the row."""
        from datacenter.tenancy.models import generate_token_key

        key = AGENT_TOKEN_PREFIX + generate_token_key()[len("dct_") :]
        self.token_lookup = key[len(AGENT_TOKEN_PREFIX) : len(AGENT_TOKEN_PREFIX) + AGENT_TOKEN_LOOKUP_CHARS]
        self.token_hash = hash_token_key(key)
        return key

    def token_matches(self, key: str) -> bool:
        import secrets

        return bool(self.token_hash) and secrets.compare_digest(self.token_hash, hash_token_key(key))

    @classmethod
    def authenticate(cls, key: str) -> AgentNode | None:
        """The enabled agent whose token is `key`, or None."""
        if not key:
            return None
        node = cls.objects.filter(token_hash=hash_token_key(key), enabled=True).select_related("host").first()
        if node is None:  # a token replaced by a rotation works until its grace window ends
            from datacenter.tenancy.models import RetiredKey

            owner = RetiredKey.owner_of(RetiredKey.Kind.AGENT, key)
            if owner is not None:
                node = cls.objects.filter(pk=owner, enabled=True).select_related("host").first()
        return node


from .models_sync import AgentListenerAck, AgentSync, ListenerTable, PushSettings  # noqa: E402,F401
