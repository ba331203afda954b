import pytest

from datacenter.testing import World, build_world


@pytest.fixture
def world(db, fast_password_hashing) -> World:
    return build_world()


@pytest.fixture
def fast_password_hashing(settings):
    # The world's five users cost ~8 s with the production PBKDF2 work factor; passwords are not
    # what these tests are about.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def fresh_document_cache():
    """Each test's database restarts the document counter; the process-wide cache must not
    serve a previous test's document under the same number."""
    from datacenter.loadbalancing.desired_state import document_cache

    document_cache.clear()
    yield
    document_cache.clear()
