"""Re-encrypt every stored machine credential with the current P2V_CREDENTIAL_KEY (see p2v/credentials.py)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from p2v.credentials import CredentialError, is_current, reencrypt_secret
from p2v.models import Machine


class Command(BaseCommand):
    help = (
        "Re-encrypt every machine credential with the current key (P2V_CREDENTIAL_KEY), reading old ones "
        "with P2V_CREDENTIAL_OLD_KEYS. Run after setting a new key; then the old key can be dropped."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="Only report what would change.")

    def handle(self, *args, dry_run: bool = False, **options):
        rotated, current, unreadable = 0, 0, []
        machines = Machine.objects.exclude(credential_ciphertext="").only(
            "pk", "name", "credential_ciphertext"
        )
        with transaction.atomic():
            for machine in machines.select_for_update():
                if is_current(machine.credential_ciphertext):
                    current += 1
                    continue
                try:
                    ciphertext = reencrypt_secret(machine.credential_ciphertext)
                except CredentialError:
                    unreadable.append(machine.name)
                    continue
                rotated += 1
                if not dry_run:
                    Machine.objects.filter(pk=machine.pk).update(credential_ciphertext=ciphertext)
            if unreadable:
                # Nothing is half-done: the transaction is rolled back and the reason names them.
                raise CommandError(
                    f"{len(unreadable)} credential(s) cannot be decrypted with P2V_CREDENTIAL_KEY or "
                    f"P2V_CREDENTIAL_OLD_KEYS: {', '.join(sorted(unreadable)[:20])}; add their key to "
                    "P2V_CREDENTIAL_OLD_KEYS (nothing was changed)"
                )
        verb = "would re-encrypt" if dry_run else "re-encrypted"
        self.stdout.write(f"{verb} {rotated} credential(s); {current} already use the current key")
