"""Hosts of the datacenter: hypervisors, load-balancer nodes, backend hosts, P2V sources."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models

from datacenter.tenancy.models import Tenant

from .choices import HostRole


def validate_host_roles(value) -> None:
    if not isinstance(value, list):
        raise ValidationError(f"roles must be a list of role names, got {type(value).__name__}.")
    allowed = set(HostRole.values)
    unknown = [role for role in value if role not in allowed]
    if unknown:
        raise ValidationError(f"unknown role(s) {unknown}; expected some of {sorted(allowed)}.")
    if len(set(value)) != len(value):
        raise ValidationError(f"roles {value} contain duplicates.")


class Host(models.Model):
    """A machine. `tenant` NULL = shared infrastructure (operators only); set = a tenant's host."""

    name = models.CharField(max_length=100, unique=True)
    management_address = models.GenericIPAddressField(unpack_ipv4=True)
    roles = models.JSONField(default=list, blank=True, validators=[validate_host_roles])
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, null=True, blank=True, related_name="hosts")
    description = models.CharField(max_length=200, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def has_role(self, role: str) -> bool:
        return role in (self.roles or [])
