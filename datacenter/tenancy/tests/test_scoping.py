"""The queryset layer: who sees which tenant's rows and who may write."""

from datacenter.loadbalancing.models import Listener, Vip
from datacenter.tenancy import scoping


def test_restrict_follows_memberships_and_operators_see_all(world):
    users = world.users
    assert list(scoping.restrict(Vip.objects.all(), users["b_member"])) == [world.vip_b]
    assert list(scoping.restrict(Listener.objects.all(), users["a_viewer"], "vip__tenant")) == [
        world.listener_a
    ]
    assert scoping.restrict(Vip.objects.all(), users["operator"]).count() == 2
    assert set(scoping.tenants_for(users["operator"])) == {world.tenant_a, world.tenant_b}


def test_roles_decide_writes(world):
    a = world.tenant_a.pk
    assert scoping.can_write(world.users["a_member"], a)
    assert scoping.can_write(world.users["a_admin"], a)
    assert not scoping.can_write(world.users["a_viewer"], a)
    assert scoping.can_read(world.users["a_viewer"], a)
    assert not scoping.can_read(world.users["b_member"], a)
    assert not scoping.can_write(world.users["b_member"], a)
    assert scoping.can_write(world.users["operator"], a)
