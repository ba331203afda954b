"""Tenants (with quotas), who belongs to them, and the API tokens people use to call the portal."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from .choices import MembershipRole

TOKEN_PREFIX = "dct_"  # noqa: S105 - public key prefix, not a secret
TOKEN_LOOKUP_CHARS = 8  # stored in clear (indexed) to find the row; the rest is only hashed


class Tenant(models.Model):
    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True)
    description = models.CharField(max_length=200, blank=True)
    max_vips = models.PositiveIntegerField(default=10, validators=[MinValueValidator(0)])
    max_listeners_per_vip = models.PositiveIntegerField(default=8, validators=[MinValueValidator(0)])
    max_backends_per_listener = models.PositiveIntegerField(default=64, validators=[MinValueValidator(0)])
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=MembershipRole.choices, default=MembershipRole.MEMBER)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant__name", "user__username"]
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="membership_unique_user_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


def hash_token_key(key: str) -> str:
    """SHA-256 of a token key: keys are 256-bit random, so a fast hash is enough (no brute force)."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_token_key() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_lookup(key: str) -> str:
    return key[len(TOKEN_PREFIX) : len(TOKEN_PREFIX) + TOKEN_LOOKUP_CHARS]


class ApiTokenQuerySet(models.QuerySet):
    def create_token(self, user, *, name: str = "", write_enabled: bool = True, expires=None):
        """Create a token and return (token, key). The key is shown once and never stored."""
        key = generate_token_key()
        token = self.create(
            user=user,
            name=name,
            write_enabled=write_enabled,
            expires=expires,
            key_lookup=token_lookup(key),
            key_hash=hash_token_key(key),
        )
        return token, key


class ApiToken(models.Model):
    """A bearer token acting as its user, possibly read-only; only a hash of the key is kept."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    key_lookup = models.CharField(max_length=TOKEN_LOOKUP_CHARS, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    write_enabled = models.BooleanField(default=True)
    expires = models.DateTimeField(null=True, blank=True)
    last_used = models.DateTimeField(null=True, blank=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}{self.key_lookup}… ({self.user})"

    @property
    def is_expired(self) -> bool:
        return self.expires is not None and self.expires <= timezone.now()

    def matches(self, key: str) -> bool:
        return secrets.compare_digest(self.key_hash, hash_token_key(key))


class RetiredKey(models.Model):
    """A credential replaced by a rotation that keeps working until `valid_until` (the grace
    window), so whoever holds it can switch to the new one without being cut off. Only the hash
    is kept, like the live credential's. (API tokens need no row: the old token simply gets
    `expires` set to the end of the window.)"""

    class Kind(models.TextChoices):
        AGENT = "agent", "agent token"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    owner_id = models.BigIntegerField(help_text="The agent node (kind agent) the key belonged to.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    valid_until = models.DateTimeField(db_index=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "retired key in its grace window"

    def __str__(self) -> str:
        return f"{self.kind} #{self.owner_id} until {self.valid_until:%Y-%m-%d %H:%M:%S}"

    @classmethod
    def owner_of(cls, kind: str, key: str) -> int | None:
        """The owner id of a retired `key` still inside its window, or None."""
        row = cls.objects.filter(
            kind=kind, key_hash=hash_token_key(key), valid_until__gt=timezone.now()
        ).first()
        return row.owner_id if row else None

    @classmethod
    def retire(cls, kind: str, owner_id: int, key_hash: str, grace_s: int) -> RetiredKey | None:
        """Keep `key_hash` valid for `grace_s` more seconds (0: not at all); prunes ended windows."""
        now = timezone.now()
        cls.objects.filter(valid_until__lte=now).delete()
        if grace_s <= 0 or not key_hash:
            return None
        row, _ = cls.objects.update_or_create(
            key_hash=key_hash,
            defaults={"kind": kind, "owner_id": owner_id, "valid_until": now + timedelta(seconds=grace_s)},
        )
        return row
