"""Idempotent demo data: an operator, a tenant user with an API token, hosts, a pool, a VIP with backends.

Credentials are generated on the first run and kept in var/demo-credentials.json (mode 0600) so
later runs print the same ones; the command prints them every time.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from rest_framework.exceptions import AuthenticationFailed

from datacenter.inventory.choices import HostRole
from datacenter.inventory.models import Host
from datacenter.loadbalancing import services
from datacenter.loadbalancing.choices import AgentRole
from datacenter.loadbalancing.models import AgentNode, Listener, Vip, VipPool
from datacenter.tenancy.authentication import ApiTokenAuthentication
from datacenter.tenancy.choices import MembershipRole
from datacenter.tenancy.models import ApiToken, Membership, Tenant

DEMO_TOKEN_NAME = "demo"  # noqa: S105 - a label, not a secret
HOSTS = [
    ("lb-1", "10.0.0.2", [HostRole.LB_NODE], False),
    ("lb-2", "10.0.0.3", [HostRole.LB_NODE], False),
    ("hv-1", "10.0.0.10", [HostRole.HYPERVISOR], False),
    ("web-1", "10.1.0.5", [HostRole.BACKEND_HOST], True),
    ("web-2", "10.1.0.6", [HostRole.BACKEND_HOST], True),
]
DEMO_MUXES = [("demo-mux-1", "lb-1", "10.0.0.2"), ("demo-mux-2", "lb-2", "10.0.0.3")]
DEMO_BACKENDS = [
    {"address": "10.1.0.5", "port": 8080, "weight": 1, "host": "web-1"},
    {"address": "10.1.0.6", "port": 8080, "weight": 1, "host": "web-2"},
]


def demo_agent_dir() -> Path:
    """Where the demo muxes' tokens live (one file per node, mode 0600); asgi.py reads them."""
    return Path(settings.VAR_DIR) / "demo-agents"


def _credentials_path() -> Path:
    return Path(settings.VAR_DIR) / "demo-credentials.json"


def _load_credentials() -> dict:
    path = _credentials_path()
    if path.exists():
        return json.loads(path.read_text())
    return {}


def _save_credentials(data: dict) -> None:
    path = _credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)


class Command(BaseCommand):
    help = (
        "Create (or refresh) the demo operator, tenant user, token, hosts, pool, VIP, listener and backends."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--no-agents",
            action="store_true",
            help="disable the two demo muxes (DEMO_AGENTS=0 make run): the demo VIP then stays pending",
        )

    def handle(self, *args, **options):
        creds = _load_credentials()
        creds.setdefault("operator_password", secrets.token_urlsafe(12))
        creds.setdefault("tenant_password", secrets.token_urlsafe(12))
        with transaction.atomic():
            operator = self._user("operator", creds["operator_password"], staff=True)
            alice = self._user("alice", creds["tenant_password"], staff=False)
            tenant, _ = Tenant.objects.get_or_create(slug="acme", defaults={"name": "Acme"})
            Membership.objects.update_or_create(
                user=alice, tenant=tenant, defaults={"role": MembershipRole.ADMIN}
            )
            creds["tenant_token"] = self._token(alice, creds.get("tenant_token"))
            for name, address, roles, owned in HOSTS:
                Host.objects.update_or_create(
                    name=name,
                    defaults={
                        "management_address": address,
                        "roles": [str(r) for r in roles],
                        "tenant": tenant if owned else None,
                    },
                )
            pool, _ = VipPool.objects.get_or_create(name="demo-public", defaults={"prefix": "203.0.113.0/24"})
            pool.tenants.add(tenant)
            vip = Vip.objects.filter(tenant=tenant, name="web").first() or services.create_vip(
                tenant=tenant,
                name="web",
                pool=pool,
                address="203.0.113.10",
                user=operator,
                description="demo web VIP",
            )
            listener = Listener.objects.filter(
                vip=vip, protocol="tcp", port=80
            ).first() or services.create_listener(
                vip=vip,
                protocol="tcp",
                port=80,
                name="http",
                user=operator,
            )
            services.replace_backends(listener, DEMO_BACKENDS, user=operator)
            self._demo_muxes(enabled=not options["no_agents"])
        _save_credentials(creds)
        self.stdout.write(self._summary(creds, tenant, vip, listener))

    def _demo_muxes(self, *, enabled: bool) -> None:
        """The demo muxes' nodes, each with a fresh token in var/demo-agents/<node>.token (0600).
        Disabled (not counted for ACTIVE) when the demo runs without them."""
        directory = demo_agent_dir()
        directory.mkdir(parents=True, exist_ok=True)
        for name, host_name, address in DEMO_MUXES:
            node = AgentNode.objects.filter(name=name).first() or AgentNode(
                name=name, host=Host.objects.get(name=host_name), role=AgentRole.MUX, address=address
            )
            node.enabled = enabled
            key = node.set_new_token()  # a new token each run: the file is the only copy
            node.save()
            path = directory / f"{name}.token"
            if enabled:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(key)
            else:
                path.unlink(missing_ok=True)

    def _user(self, username: str, password: str, *, staff: bool):
        user, _ = get_user_model().objects.get_or_create(username=username)
        user.is_staff = user.is_superuser = staff
        user.is_active = True
        user.set_password(password)
        user.save()
        return user

    def _token(self, user, known_key: str | None) -> str:
        if known_key:
            try:
                found, _token = ApiTokenAuthentication().authenticate_key(known_key)
            except AuthenticationFailed:  # revoked, expired or from another database
                found = None
            if found == user:
                return known_key
        ApiToken.objects.filter(user=user, name=DEMO_TOKEN_NAME).delete()
        _, key = ApiToken.objects.create_token(user, name=DEMO_TOKEN_NAME, write_enabled=True)
        return key

    def _summary(self, creds: dict, tenant: Tenant, vip: Vip, listener: Listener) -> str:
        token = creds["tenant_token"]
        return "\n".join(
            [
                "Demo data ready (credentials kept in var/demo-credentials.json):",
                f"  operator:     operator / {creds['operator_password']}   (Django admin at /admin/)",
                f"  tenant user:  alice / {creds['tenant_password']}   (tenant {tenant.slug}, role admin)",
                f"  tenant token: {token}",
                f"  VIP {vip.name} {vip.address}, listener {listener.id} tcp/{listener.port}, "
                f"generation {Listener.objects.get(pk=listener.pk).generation}",
                "  try:",
                f'    curl -s -H "Authorization: Token {token}" http://127.0.0.1:8000/api/vips/',
                f'    curl -s -H "Authorization: Token {token}" http://127.0.0.1:8000/api/listeners/{listener.id}/backends/',
                "",
            ]
        )
