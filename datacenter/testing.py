"""Test helpers shared by every portal test: a two-tenant world and API clients for each role.

`build_world()` makes tenants "acme" (A) and "globex" (B), an operator, a member, a viewer and a
member of B, each with a token, plus objects of A (host, pool, VIP, listener with two backends)
and of B. Tests ask a role's client for requests: `world.client("b_member").get(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from datacenter.inventory.models import Host
from datacenter.loadbalancing import services
from datacenter.loadbalancing.models import AgentNode, Listener, Vip, VipPool
from datacenter.tenancy.choices import MembershipRole
from datacenter.tenancy.models import ApiToken, Membership, Tenant

ROLES = ("operator", "a_admin", "a_member", "a_viewer", "b_member")


@dataclass
class World:
    tenant_a: Tenant
    tenant_b: Tenant
    users: dict[str, Any]
    keys: dict[str, str]
    pool: VipPool
    pool_a_only: VipPool
    host_a: Host
    host_shared: Host
    vip_a: Vip
    listener_a: Listener
    vip_b: Vip
    listener_b: Listener
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, role: str) -> APIClient:
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Token {self.keys[role]}")
        return api


def make_user(username: str, *, operator: bool = False, password: str | None = None):
    """A user; without a password it can only use tokens (and tests skip the slow password hash)."""
    return get_user_model().objects.create_user(
        username=username, password=password, is_staff=operator, is_superuser=operator
    )


def make_token(user, *, write_enabled: bool = True) -> str:
    return ApiToken.objects.create_token(user, name="test", write_enabled=write_enabled)[1]


def build_world() -> World:
    tenant_a = Tenant.objects.create(name="Acme", slug="acme")
    tenant_b = Tenant.objects.create(name="Globex", slug="globex")
    users = {role: make_user(role, operator=role == "operator") for role in ROLES}
    Membership.objects.create(user=users["a_admin"], tenant=tenant_a, role=MembershipRole.ADMIN)
    Membership.objects.create(user=users["a_member"], tenant=tenant_a, role=MembershipRole.MEMBER)
    Membership.objects.create(user=users["a_viewer"], tenant=tenant_a, role=MembershipRole.VIEWER)
    Membership.objects.create(user=users["b_member"], tenant=tenant_b, role=MembershipRole.MEMBER)
    keys = {role: make_token(user) for role, user in users.items()}
    pool = VipPool.objects.create(name="public", prefix="203.0.113.0/24")
    pool.tenants.add(tenant_a, tenant_b)
    pool_a_only = VipPool.objects.create(name="private-a", prefix="198.51.100.0/24")
    pool_a_only.tenants.add(tenant_a)
    host_a = Host.objects.create(
        name="web-a1", management_address="10.1.0.5", roles=["backend-host"], tenant=tenant_a
    )
    host_shared = Host.objects.create(name="lb-1", management_address="10.0.0.2", roles=["lb-node"])
    operator = users["operator"]
    vip_a = services.create_vip(tenant=tenant_a, name="web", address="203.0.113.10", user=operator)
    listener_a = services.create_listener(vip=vip_a, protocol="tcp", port=80, user=operator)
    services.replace_backends(
        listener_a,
        [
            {"address": "10.1.0.5", "port": 8080, "host": "web-a1"},
            {"address": "10.1.0.6", "port": 8080, "weight": 2},
        ],
        user=operator,
    )
    vip_b = services.create_vip(tenant=tenant_b, name="web", address="203.0.113.20", user=operator)
    listener_b = services.create_listener(vip=vip_b, protocol="tcp", port=443, user=operator)
    services.replace_backends(listener_b, [{"address": "10.2.0.5", "port": 8443}], user=operator)
    return World(
        tenant_a=tenant_a,
        tenant_b=tenant_b,
        users=users,
        keys=keys,
        pool=pool,
        pool_a_only=pool_a_only,
        host_a=host_a,
        host_shared=host_shared,
        vip_a=vip_a,
        listener_a=Listener.objects.get(pk=listener_a.pk),
        vip_b=vip_b,
        listener_b=Listener.objects.get(pk=listener_b.pk),
    )


def new_agent(name: str, host: Host, address: str | None, role: str = "mux") -> tuple[AgentNode, str]:
    """An enabled agent node with a fresh token: the node and its token (shown once)."""
    node = AgentNode(name=name, host=host, role=role, address=address)
    token = node.set_new_token()
    node.save()
    return node, token
