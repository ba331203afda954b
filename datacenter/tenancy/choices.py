"""Membership roles, ordered from least to most privileged."""

from django.db import models


class MembershipRole(models.TextChoices):
    VIEWER = "viewer", "Viewer (read only)"
    MEMBER = "member", "Member (read and write)"
    ADMIN = "admin", "Admin (read, write, manage tokens)"


WRITE_ROLES = frozenset({MembershipRole.MEMBER, MembershipRole.ADMIN})
