"""Django admin for P2V; the private key is write-only here too (stored encrypted)."""

from django import forms
from django.contrib import admin

from . import ssh
from .models import Assessment, ConversionEvent, ConversionPolicy, Machine, SecurityEvent


class MachineAdminForm(forms.ModelForm):
    private_key = forms.CharField(
        widget=forms.Textarea,
        required=False,
        strip=False,
        help_text="Unencrypted OpenSSH/PEM private key. Leave empty to keep the stored one.",
    )

    class Meta:
        model = Machine
        fields = [
            "name",
            "description",
            "address",
            "ssh_port",
            "ssh_user",
            "host_key_fingerprint",
            "tenant",
            "policy",
            "connect_timeout_s",
            "command_timeout_s",
            "scheduled_conversion_at",
        ]

    def clean_private_key(self) -> str:
        value = self.cleaned_data["private_key"]
        if not value and not (self.instance and self.instance.credential_ciphertext):
            raise forms.ValidationError("A new machine needs its SSH private key.")
        if value:
            try:
                ssh.load_private_key(value)
            except ValueError as exc:
                raise forms.ValidationError(str(exc)) from None
        return value

    def clean_host_key_fingerprint(self) -> str:
        value = self.cleaned_data["host_key_fingerprint"]
        try:
            return ssh.normalize_fingerprint(value) if value else ""
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None


@admin.register(Machine)
class MachineAdmin(admin.ModelAdmin):
    form = MachineAdminForm
    list_display = ["name", "address", "ssh_port", "ssh_user", "host_key_fingerprint", "tenant"]
    search_fields = ["name", "address"]
    readonly_fields = ["credential_public_key", "host_key_source", "host_key_pinned_at"]

    def save_model(self, request, obj, form, change):
        if form.cleaned_data.get("private_key"):
            obj.set_private_key(form.cleaned_data["private_key"])
        super().save_model(request, obj, form, change)


@admin.register(Assessment)
class AssessmentAdmin(admin.ModelAdmin):
    list_display = ["id", "machine", "status", "compatibility_score", "created", "duration_s"]
    list_filter = ["status"]
    readonly_fields = [f.name for f in Assessment._meta.fields]


@admin.register(ConversionEvent)
class ConversionEventAdmin(admin.ModelAdmin):
    list_display = ["id", "machine", "kind", "status", "raised_by", "created"]
    list_filter = ["kind", "status"]


@admin.register(ConversionPolicy)
class ConversionPolicyAdmin(admin.ModelAdmin):
    list_display = ["name", "is_default", "mode", "assessment_interval_s"]


@admin.register(SecurityEvent)
class SecurityEventAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "machine", "address", "created"]
    readonly_fields = [f.name for f in SecurityEvent._meta.fields]
