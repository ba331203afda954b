import pytest
from django.core.management import call_command

from datacenter.testing import World, build_world


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # The production hasher takes ~0.5 s per password on these machines; tests only need correctness.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def world(db) -> World:
    return build_world()


@pytest.fixture(scope="module")
def module_world(django_db_setup, django_db_blocker) -> World:
    """One committed world per module (building it per test dominated the run time).

    Tests using it must also request `db`: each test then runs in a transaction that is rolled
    back, so their writes never leak into the next test. The tables are emptied afterwards.
    """
    with django_db_blocker.unblock():
        built = build_world()
    yield built
    with django_db_blocker.unblock():
        call_command("flush", interactive=False, verbosity=0)
