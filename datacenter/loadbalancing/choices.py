"""Enumerations of the load-balancing domain (statuses follow Octavia's vocabulary)."""

from django.db import models


class ProvisioningStatus(models.TextChoices):
    PENDING_CREATE = "pending_create", "Pending create"
    PENDING_UPDATE = "pending_update", "Pending update"
    PENDING_DELETE = "pending_delete", "Pending delete"
    ACTIVE = "active", "Active (applied by every mux)"
    ERROR = "error", "Error"


class OperatingStatus(models.TextChoices):
    ONLINE = "online", "Online"
    DEGRADED = "degraded", "Degraded"
    OFFLINE = "offline", "Offline"
    ERROR = "error", "Error"
    NO_MONITOR = "no_monitor", "No monitor"


class Protocol(models.TextChoices):
    TCP = "tcp", "TCP"
    UDP = "udp", "UDP"


class BackendState(models.TextChoices):
    ACTIVE = "active", "Active"
    DRAINING = "draining", "Draining (no new flows)"
    DISABLED = "disabled", "Disabled"


class AgentRole(models.TextChoices):
    MUX = "mux", "Mux (load-balancer instance)"
    HOST = "host", "Host agent (fast path, backends)"


class HealthCheckKind(models.TextChoices):
    TCP = "tcp", "TCP connect"
    HTTP = "http", "HTTP GET"


BACKEND_WEIGHT_MIN = 1
BACKEND_WEIGHT_MAX = 256
PORT_MIN = 1
PORT_MAX = 65535
DRAIN_TIMEOUT_MAX_S = 3600
# A flow's idle timeout on the agents (kernel pins and flow records); the agents' own bounds
# (lbagent.state MIN/MAX_FLOW_IDLE_TIMEOUT_S): a value outside them would make every agent refuse
# the listener. Null on a listener means the agents' per-protocol default (TCP 7,440 s, UDP 120 s).
FLOW_IDLE_TIMEOUT_MIN_S = 2
FLOW_IDLE_TIMEOUT_MAX_S = 7 * 86_400
FLOW_IDLE_TIMEOUT_RANGE = (
    f"whole seconds from {FLOW_IDLE_TIMEOUT_MIN_S} to {FLOW_IDLE_TIMEOUT_MAX_S} (7 days), "
    "or null for the agents' default (TCP 7440, UDP 120)"
)
# A listener's backend cap sizes its Maglev table on the agents (the smallest prime above 100 x the
# cap, at most the cluster's table size: lbagent.state.table_size_for_cap); the agents' own bound
# (lbagent.state.MAX_BACKENDS_PER_LISTENER). Null: the cluster's table size.
BACKEND_CAP_MIN = 1
BACKEND_CAP_MAX = 4096
BACKEND_CAP_RANGE = (
    f"a whole number from {BACKEND_CAP_MIN} to {BACKEND_CAP_MAX}, or null for the cluster's table size"
)
