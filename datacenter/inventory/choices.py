"""What a host is used for (a host may have several roles)."""

from django.db import models


class HostRole(models.TextChoices):
    HYPERVISOR = "hypervisor", "Hypervisor"
    LB_NODE = "lb-node", "Load-balancer node"
    BACKEND_HOST = "backend-host", "Backend host"
    PHYSICAL_SOURCE = "physical-source", "Physical source (P2V)"
