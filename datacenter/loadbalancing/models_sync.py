"""What the portal pushed to agents and what they acknowledged: the state behind
provisioning_status, operating_status and the VIP status tree (agent_sync.py writes these)."""

from __future__ import annotations

from django.db import models

from .models import AgentNode, Listener


class PushSettings(models.Model):
    """Cluster-wide parameters of the desired state, one row (pk=1), plus the document counter.

    `generation` numbers desired-state documents: every relevant change bumps it, so a document
    with a higher number is never older. Peer and redirect keys are not stored: they are derived
    from SECRET_KEY and `key_epoch` (bump the epoch to rotate them).
    """

    generation = models.BigIntegerField(default=0)
    hash_seed = models.BigIntegerField(default=0x5EED)
    owner_seed = models.BigIntegerField(default=7919)
    table_size = models.PositiveIntegerField(default=65537)
    max_records = models.PositiveIntegerField(default=100_000)
    key_epoch = models.PositiveIntegerField(default=1)

    class Meta:
        verbose_name = "agent push settings"
        verbose_name_plural = "agent push settings"

    def __str__(self) -> str:
        return f"push settings (document generation {self.generation})"


class ListenerTable(models.Model):
    """The backend list the muxes actually run for a listener: the configured generation minus
    backends the agents' health checks agree are down. `number` is the listener generation in
    the desired state (what agents acknowledge); it changes whenever that list changes, and the
    list it replaced stays as `previous` until its drain deadline."""

    listener = models.OneToOneField(Listener, on_delete=models.CASCADE, related_name="table")
    number = models.PositiveBigIntegerField(default=1)
    config_generation = models.PositiveIntegerField(default=0)
    backends = models.JSONField(default=list)
    previous = models.JSONField(null=True, blank=True)  # {"generation", "backends", "drain_deadline"}
    updated = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"table {self.number} of listener {self.listener_id}"


class AgentSync(models.Model):
    """Connection and health-report state of one agent."""

    agent = models.OneToOneField(AgentNode, on_delete=models.CASCADE, related_name="sync")
    connected = models.BooleanField(default=False)
    version = models.CharField(max_length=64, blank=True)
    connected_at = models.DateTimeField(null=True, blank=True)
    disconnected_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)  # reason of the last failed apply ("" after a success)
    error_generation = models.BigIntegerField(null=True, blank=True)
    unhealthy = models.JSONField(default=dict, blank=True)  # {"<listener>|<address>|<port>": reason}
    # Connection epoch: bumped by every hello. Acknowledgements are recorded only under the epoch
    # of the connection they came on, so a replaced (dead) connection's late acks cannot
    # overwrite what the agent's hello on the new connection said it runs.
    epoch = models.PositiveBigIntegerField(default=0)
    disconnect_reason = models.CharField(max_length=200, blank=True)
    # Times a consumer found the cluster's document counter ahead of what it had sent with no
    # notification arriving (the channel layer dropped it) and resynced the agent.
    missed_notifications = models.PositiveBigIntegerField(default=0)
    # Times the agent's acknowledgements lagged the sent document so long that it was re-sent.
    lag_resends = models.PositiveBigIntegerField(default=0)
    stale_acks_ignored = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"sync of {self.agent_id}"


class AgentListenerAck(models.Model):
    """The listener generation (ListenerTable.number) an agent last acknowledged (0: it does not
    serve the listener), and why it is not at the listener's generation when it said so."""

    agent = models.ForeignKey(AgentNode, on_delete=models.CASCADE, related_name="listener_acks")
    listener = models.ForeignKey(Listener, on_delete=models.CASCADE, related_name="agent_acks")
    generation = models.PositiveBigIntegerField()
    error = models.TextField(blank=True, default="")
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["agent", "listener"], name="agentlistenerack_unique")]
        # Every ack batch asks which listeners its agents refused, and every status evaluation
        # whether anyone refused a listener: almost no rows, out of thousands.
        indexes = [
            models.Index(fields=["agent"], condition=~models.Q(error=""), name="agentlistenerack_refused"),
            models.Index(
                fields=["listener"], condition=~models.Q(error=""), name="agentlistenerack_refused_l"
            ),
        ]

    def __str__(self) -> str:
        return f"agent {self.agent_id} runs listener {self.listener_id} generation {self.generation}"


class VipListVersion(models.Model):
    """A tenant's VIP list version: database triggers (migration 0007) give it a new value in every
    transaction that inserts, updates or deletes one of the tenant's VIPs or updates the tenant
    (its name orders the list), whatever wrote them (ORM save, queryset update, raw SQL, the
    admin). The VIP list cache (vip_list_cache.py) serves a body only while the versions it was
    read under are still current. No foreign key: a value must never come back after a delete."""

    tenant_id = models.BigIntegerField(primary_key=True)
    version = models.BigIntegerField()

    def __str__(self) -> str:
        return f"VIP list of tenant {self.tenant_id} at version {self.version}"


def _connect_signals() -> None:
    # Here rather than in AppConfig.ready: this module is the push feature's one entry point.
    from .agent_sync import connect_signals

    connect_signals()


_connect_signals()
