"""P2V serializers: the machine's private key is write-only; facts and findings are read-only."""

from __future__ import annotations

from rest_framework import serializers

from datacenter.api.serializers import BaseModelSerializer, url_field

from .. import ssh
from ..choices import HostKeySource
from ..models import Assessment, ConversionEvent, ConversionPolicy, Machine, SecurityEvent


class MachineSerializer(BaseModelSerializer):
    url = url_field("p2v-api:machine-detail")
    private_key = serializers.CharField(
        write_only=True,
        required=False,
        trim_whitespace=False,
        style={"base_template": "textarea.html"},
        help_text="Unencrypted OpenSSH/PEM private key (Ed25519, ECDSA or RSA); stored encrypted, "
        "never returned.",
    )
    sudo_password = serializers.CharField(
        write_only=True,
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        style={"input_type": "password"},
        help_text="Only for an ssh_user other than root without NOPASSWD sudo: its sudo password; stored "
        "encrypted, never returned; empty removes it.",
    )
    has_credential = serializers.SerializerMethodField()
    has_sudo_password = serializers.SerializerMethodField()
    latest_assessment = serializers.SerializerMethodField()

    class Meta:
        model = Machine
        fields = [
            "id",
            "url",
            "display",
            "name",
            "description",
            "address",
            "ssh_port",
            "ssh_user",
            "private_key",
            "has_credential",
            "sudo_password",
            "has_sudo_password",
            "credential_public_key",
            "host_key_fingerprint",
            "host_key_source",
            "host_key_pinned_at",
            "tenant",
            "policy",
            "connect_timeout_s",
            "command_timeout_s",
            "scheduled_conversion_at",
            "latest_assessment",
            "created",
            "updated",
        ]
        read_only_fields = [
            "credential_public_key",
            "host_key_source",
            "host_key_pinned_at",
            "created",
            "updated",
        ]

    def get_has_credential(self, obj) -> bool:
        return bool(obj.credential_ciphertext)

    def get_has_sudo_password(self, obj) -> bool:
        return bool(obj.sudo_password_ciphertext)

    def validate_sudo_password(self, value: str) -> str:
        if "\n" in value or "\r" in value:
            raise serializers.ValidationError("The sudo password must be one line.")
        return value

    def get_latest_assessment(self, obj) -> int | None:
        if hasattr(obj, "latest_assessment_id"):  # annotated by the viewset's queryset (no N+1)
            return obj.latest_assessment_id
        latest = obj.latest_assessment
        return latest.pk if latest else None

    def validate_private_key(self, value: str) -> str:
        try:
            ssh.load_private_key(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return value

    def validate_host_key_fingerprint(self, value: str) -> str:
        if not value:
            return ""
        try:
            return ssh.normalize_fingerprint(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate(self, attrs):
        if self.instance is None and not attrs.get("private_key"):
            raise serializers.ValidationError({"private_key": "A new machine needs its SSH private key."})
        return attrs

    def _apply(self, machine: Machine, attrs: dict) -> Machine:
        private_key = attrs.pop("private_key", None)
        sudo_password = attrs.pop("sudo_password", None)
        fingerprint_given = "host_key_fingerprint" in attrs
        for name, value in attrs.items():
            setattr(machine, name, value)
        if private_key is not None:
            machine.set_private_key(private_key)
        if sudo_password is not None:
            machine.set_sudo_password(sudo_password)
        if fingerprint_given:
            # An admin-supplied fingerprint is checked from the first connection; clearing it
            # (after a legitimate reinstall) makes the next connection pin again.
            machine.host_key_source = (
                HostKeySource.ADMIN if machine.host_key_fingerprint else HostKeySource.NONE
            )
            machine.host_key_pinned_at = None
        machine.full_clean(exclude=["credential_ciphertext"])
        machine.save()
        return machine

    def create(self, validated_data):
        return self._apply(Machine(), dict(validated_data))

    def update(self, instance, validated_data):
        return self._apply(instance, dict(validated_data))


class AssessmentSerializer(BaseModelSerializer):
    url = url_field("p2v-api:assessment-detail")

    class Meta:
        model = Assessment
        fields = [
            "id",
            "url",
            "display",
            "machine",
            "status",
            "trigger",
            "requested_by",
            "facts_schema",
            "facts",
            "compatibility_score",
            "compatible",
            "blockers",
            "warnings",
            "error",
            "host_key_fingerprint",
            "created",
            "started",
            "finished",
            "duration_s",
        ]
        read_only_fields = fields


class ConversionEventSerializer(BaseModelSerializer):
    url = url_field("p2v-api:conversionevent-detail")

    class Meta:
        model = ConversionEvent
        fields = [
            "id",
            "url",
            "display",
            "machine",
            "kind",
            "status",
            "details",
            "raised_by",
            "raised_by_user",
            "assessment",
            "decided_by",
            "decided_at",
            "decision_note",
            "started_at",
            "created",
        ]
        read_only_fields = fields


class DecisionSerializer(serializers.Serializer):
    note = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class ConvertRequestSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class ConversionPolicySerializer(BaseModelSerializer):
    url = url_field("p2v-api:conversionpolicy-detail")

    class Meta:
        model = ConversionPolicy
        fields = [
            "id",
            "url",
            "display",
            "name",
            "is_default",
            "mode",
            "assessment_interval_s",
            "io_error_increase_threshold",
            "ecc_ce_increase_threshold",
            "memory_cap_bytes",
            "supported_firmware",
            "target_pool_free_bytes",
            "min_boot_free_bytes",
            "created",
            "updated",
        ]
        read_only_fields = ["created", "updated"]

    def validate_supported_firmware(self, value):
        if not isinstance(value, list) or not value or any(item not in ("bios", "uefi") for item in value):
            raise serializers.ValidationError(
                f'expected a non-empty list of "bios" and/or "uefi", got {value!r}'
            )
        return sorted(set(value))


class SecurityEventSerializer(BaseModelSerializer):
    url = url_field("p2v-api:securityevent-detail")

    class Meta:
        model = SecurityEvent
        fields = [
            "id",
            "url",
            "display",
            "kind",
            "machine",
            "assessment",
            "address",
            "port",
            "expected_fingerprint",
            "presented_fingerprint",
            "message",
            "created",
        ]
        read_only_fields = fields
