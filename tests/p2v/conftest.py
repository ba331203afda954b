"""Fixtures of the P2V assessment integration tests: the stand-in machine and a real Celery worker."""

from tests.services import celery_worker  # noqa: F401  (session fixture)
from tests.standin.machine import standin_fixture

standin_machine = standin_fixture("bios")
standin_uefi = standin_fixture("uefi")
