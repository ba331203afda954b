"""Keeping agents in sync with the database: on every relevant change recompute the listener
tables, number a new desired-state document and tell every connected agent's consumer (through
the channel layer: Redis in production); on acknowledgements and health reports update
provisioning_status, operating_status and the dashboards' event groups.

Statuses (Octavia's vocabulary): a listener is PENDING_UPDATE until every enabled mux has
acknowledged its current table generation, then ACTIVE; ERROR (with the agent's reason) when a
mux that has not applied it reported a failed apply. A disconnected mux still counts: it keeps
forwarding with its old state (fail static), so the change is not done until it resyncs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Exists, F, OuterRef, Q, Subquery
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from lbagent.protocol import Applied, Health, Hello

from . import desired_state
from .choices import AgentRole, BackendState, OperatingStatus, ProvisioningStatus
from .models import AgentNode, Generation, Listener, Vip
from .models_sync import AgentListenerAck, AgentSync, ListenerTable, PushSettings
from .services import backend_as_dict
from .signals import generation_staged

logger = logging.getLogger("datacenter.loadbalancing.agent_sync")

AGENTS_GROUP = "lb.agents"  # every connected agent consumer


def agent_group(agent_id: int) -> str:
    return f"lb.agent.{agent_id}"


def tenant_group(tenant_id: int) -> str:
    return f"lb.tenant.{tenant_id}"


def vip_group(vip_id: int) -> str:
    return f"lb.vip.{vip_id}"


def listener_group(listener_id: int) -> str:
    return f"lb.listener.{listener_id}"


OPERATORS_GROUP = "lb.operators"


# --- channel layer --------------------------------------------------------------------------------


async def _groups_with_members(layer, groups: list[str]) -> set[str]:
    """Which of these groups have members, in one Redis round trip per host.

    channels_redis' group_send makes two round trips (drop expired members, list members) even
    for a group nobody is in, and most groups an event goes to are empty (a tenant's, a VIP's, a
    listener's dashboard groups when no browser watches them): under load, those sends were
    about a third of a web worker's CPU samples (py-spy, docs/bench-load.md). A group found empty
    here is skipped, which is what group_send does with it (a member joining meanwhile misses
    the message either way). Layers other than channels_redis: every group counts as occupied."""
    if not settings.DATACENTER_SKIP_EMPTY_GROUPS or not all(
        hasattr(layer, name) for name in ("_group_key", "consistent_hash", "connection")
    ):
        return set(groups)
    by_host: dict[int, list[str]] = {}
    for group in dict.fromkeys(groups):
        by_host.setdefault(layer.consistent_hash(group), []).append(group)
    occupied: set[str] = set()
    for index, own in by_host.items():
        pipe = layer.connection(index).pipeline(transaction=False)
        for group in own:
            pipe.zcard(layer._group_key(group))
        counts = await pipe.execute()
        occupied.update(group for group, count in zip(own, counts, strict=True) if count)
    return occupied


def _send_all(messages: list[tuple[str, dict[str, Any]]]) -> None:
    """group_send every (group, message) in one trip to the event loop, skipping empty groups."""
    layer = get_channel_layer()
    if layer is None or not messages:
        return

    async def send() -> None:
        occupied = await _groups_with_members(layer, [group for group, _ in messages])
        for group, message in messages:
            if group in occupied:
                await layer.group_send(group, message)

    try:
        async_to_sync(send)()
    except Exception:  # the change is committed; agents resync on their next connect anyway
        logger.exception("could not publish %d message(s) to the channel layer", len(messages))


def _group_send(group: str, message: dict[str, Any]) -> None:
    _send_all([(group, message)])


def event_messages(
    kind: str,
    data: dict[str, Any],
    *,
    tenant_id: int | None = None,
    vip_id: int | None = None,
    listener_id: int | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """A dashboard event addressed to the operators' group and its tenant's and objects' groups."""
    message = {"type": "lb.event", "kind": kind, "data": data, "time": time.time()}
    groups = [OPERATORS_GROUP]
    if tenant_id is not None:
        groups.append(tenant_group(tenant_id))
    if vip_id is not None:
        groups.append(vip_group(vip_id))
    if listener_id is not None:
        groups.append(listener_group(listener_id))
    return [(group, message) for group in groups]


def publish_event(kind: str, data: dict[str, Any], **targets: int | None) -> None:
    _send_all(event_messages(kind, data, **targets))


def notify_agents(generation: int, delta: dict[str, Any] | None = None) -> None:
    """Wake every agent consumer; `delta` (desired_state.listener_delta) lets them forward the
    change without reading the database."""
    message: dict[str, Any] = {"type": "state.changed", "generation": generation}
    if delta is not None:
        message["delta"] = delta
    _group_send(AGENTS_GROUP, message)


# --- listener tables ------------------------------------------------------------------------------


def _down_backends(listener_id: int, votes: list[dict[str, str]]) -> dict[tuple[str, int], str]:
    """Backends that a majority of the reporting muxes find unhealthy, with one reason."""
    prefix = f"{listener_id}|"
    counts: dict[tuple[str, int], list[str]] = {}
    for unhealthy in votes:
        for key, reason in unhealthy.items():
            if key.startswith(prefix):
                _, address, port = key.split("|")
                counts.setdefault((address, int(port)), []).append(reason)
    return {key: reasons[0] for key, reasons in counts.items() if len(reasons) * 2 > len(votes)}


def effective_backends(
    config: list[dict[str, Any]], down: dict[tuple[str, int], str]
) -> list[dict[str, Any]]:
    """The configured list with unhealthy backends disabled (they stay listed so agents keep
    checking them and can bring them back). If every active backend is down, fail open: an
    empty table would drop all traffic, a wrong guess drops only some."""
    serving = [b for b in config if b["state"] == BackendState.ACTIVE]
    if serving and all((b["address"], b["port"]) in down for b in serving):
        return config
    return [{**b, "state": BackendState.DISABLED} if (b["address"], b["port"]) in down else b for b in config]


def _health_votes() -> list[dict[str, str]]:
    return list(
        AgentSync.objects.filter(connected=True, agent__enabled=True, agent__role=AgentRole.MUX).values_list(
            "unhealthy", flat=True
        )
    )


def _snapshot_backends(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Backend rows in their snapshot form (services.backend_as_dict, as a Generation stores
    them) -> the table's form."""
    return [
        {
            "address": r["address"],
            "port": r["port"],
            "weight": r["weight"],
            "state": r["admin_state"],
            "mac": None,
            "host": r["host"],
        }
        for r in rows
    ]


def refresh_tables(
    listener_ids: Iterable[int] | None, *, generations: Iterable[Generation] = ()
) -> list[int]:
    """Recompute the tables of the given listeners (all when None); returns those that changed.
    A change keeps the replaced list as `previous` until now + the listener's drain timeout.
    `generations`: just written, in this transaction; their listeners' backends are taken from
    the snapshot instead of being read again."""
    votes: list[dict[str, str]] | None = None  # read once, and only if a listener is monitored
    changed = []
    with transaction.atomic(savepoint=False):  # apply_change's transaction, when called from it
        given = {g.listener_id: g for g in generations}
        if given:
            listeners = [g.listener for g in given.values()]
        else:
            listeners = Listener.objects.prefetch_related("backends__host")
            if listener_ids is not None:
                listeners = listeners.filter(pk__in=list(listener_ids))
        tables = {
            # In id order: two refreshes of overlapping sets lock in the same order (no deadlock).
            t.listener_id: t
            for t in ListenerTable.objects.select_for_update().filter(listener__in=listeners).order_by("pk")
        }
        now = time.time()
        created = []
        for listener in listeners:
            config = (
                _snapshot_backends(given[listener.pk].backends)
                if listener.pk in given
                else _snapshot_backends(
                    [backend_as_dict(b) for b in sorted(listener.backends.all(), key=lambda b: b.position)]
                )
            )
            down: dict[tuple[str, int], str] = {}
            if listener.health_check:  # unmonitored: no agent checks it, so no vote counts
                votes = _health_votes() if votes is None else votes
                down = _down_backends(listener.pk, votes)
            backends = effective_backends(config, down)
            table = tables.get(listener.pk)
            if table is None:
                created.append(
                    ListenerTable(
                        listener=listener,
                        number=max(1, listener.generation),
                        config_generation=listener.generation,
                        backends=backends,
                    )
                )
                changed.append(listener.pk)
            elif table.backends != backends:
                table.previous = {
                    "generation": table.number,
                    "backends": table.backends,
                    "drain_deadline": now + listener.drain_timeout_s,
                }
                table.number += 1
                table.backends = backends
                table.config_generation = listener.generation
                table.save()
                changed.append(listener.pk)
            elif table.config_generation != listener.generation:
                table.config_generation = listener.generation
                table.save(update_fields=["config_generation", "updated"])
        # ignore_conflicts: two processes may create the same missing table at once; both agree.
        ListenerTable.objects.bulk_create(created, ignore_conflicts=True)
    return changed


def ensure_tables() -> None:
    missing = Listener.objects.filter(table__isnull=True).values_list("pk", flat=True)
    ids = list(missing)
    if ids:
        refresh_tables(ids)


# --- reacting to changes --------------------------------------------------------------------------

_pending = threading.local()


def schedule_change(listener_ids: Iterable[int] = (), *, everything: bool = False) -> None:
    """Push after the current transaction commits; many changes in one transaction, one push."""
    state = _pending.__dict__
    state.setdefault("ids", set()).update(listener_ids)
    state["everything"] = state.get("everything", False) or everything
    transaction.on_commit(_flush_pending)


def _flush_pending() -> None:
    state = _pending.__dict__
    ids, everything = state.pop("ids", set()), state.pop("everything", False)
    if not ids and not everything:
        return  # an earlier callback of the same transaction already pushed
    apply_change(None if everything else ids)


def _bump_generation() -> PushSettings:
    """Number the next document and take the PushSettings row lock (held until commit) in one
    statement."""
    table = PushSettings._meta.db_table
    for _ in range(2):
        rows = list(
            PushSettings.objects.raw(
                f"UPDATE {table} SET generation = generation + 1 WHERE id = 1 RETURNING *"  # noqa: S608
            )
        )
        if rows:
            return rows[0]
        PushSettings.objects.get_or_create(pk=1)
    raise RuntimeError("the PushSettings row could not be created")


def _stage(
    ids: list[int] | None, generations: Iterable[Generation] = ()
) -> tuple[int, dict[str, Any] | None, list[int]]:
    """Inside a transaction: refresh the tables, number the new document and read the delta the
    consumers will forward; returns (generation, delta, listeners whose table changed).

    The tables are refreshed under their own row locks first; the PushSettings row lock (which
    numbers documents cluster-wide) is taken last and held only for the delta read and the
    commit, so pushes for different listeners no longer wait for each other's whole request.
    Generations still follow commit order, and the delta, read after the lock, sees every
    earlier generation's commit: generation g's content is never older than g-1's."""
    changed = refresh_tables(ids, generations=generations)
    cluster_row = _bump_generation()
    delta = desired_state.listener_delta(cluster_row, cluster_row.generation, ids) if ids else None
    return cluster_row.generation, delta, changed


def _publish(
    generation: int, delta: dict[str, Any] | None, ids: list[int] | None, changed: list[int]
) -> None:
    notify_agents(generation, delta)
    if ids is None:
        evaluate_listeners(None)
    elif unchanged := set(ids) - set(changed):
        # A listener whose table did not change gets no new acknowledgement to settle it: do it
        # here. Changed ones were marked pending by their change and settle on the agents' acks.
        evaluate_listeners(unchanged, include_unsettled=False)


def apply_change(listener_ids: Iterable[int] | None) -> int:
    """Recompute tables, number a new document, wake the agents, update statuses."""
    ids = None if listener_ids is None else sorted(set(listener_ids))
    with transaction.atomic():
        generation, delta, changed = _stage(ids)
    _publish(generation, delta, ids, changed)
    return generation


# --- acknowledgements -----------------------------------------------------------------------------


def touch_agent(agent_id: int, **fields: Any) -> None:
    AgentNode.objects.filter(pk=agent_id).update(last_seen=timezone.now(), **fields)


def agent_connected(agent: AgentNode, version: str, hello: Hello | None = None, peer: str = "") -> int:
    """A hello: open a new connection epoch for the agent and, when the hello says what the agent
    runs, replace its acknowledgement rows with exactly that (in the same transaction, under the
    AgentSync row lock that ack batches take too, so a late ack of the replaced connection is
    either recorded before this or refused after it). Returns the new epoch."""
    listeners = None if hello is None or hello.listeners is None else dict(hello.listeners)
    errors = {} if hello is None else dict(hello.listener_errors)
    with transaction.atomic():
        AgentSync.objects.get_or_create(agent=agent)
        sync = AgentSync.objects.select_for_update().get(agent=agent)
        replaced = sync.connected
        sync.epoch += 1
        sync.connected, sync.version, sync.connected_at = True, version, timezone.now()
        sync.disconnect_reason = ""
        sync.save(update_fields=["epoch", "connected", "version", "connected_at", "disconnect_reason"])
        before: dict[int, int] = {}
        if listeners is not None:
            before = dict(
                AgentListenerAck.objects.filter(agent=agent).values_list("listener_id", "generation")
            )
            written = _write_acks(
                [(agent.pk, lid, gen, errors.get(lid, "")) for lid, gen in listeners.items()]
            )
            AgentListenerAck.objects.filter(agent=agent).exclude(
                listener__in=[row[1] for row in written]
            ).delete()
    if replaced:
        # The previous connection never said goodbye: it is dead or dying (keepalive timeout,
        # a network cut). Its consumer is told to close; its acks are refused from now on.
        logger.warning(
            "agent %s reconnected from %s while its previous connection (epoch %s) was still open: "
            "treating that one as dead",
            agent.name,
            peer or "?",
            sync.epoch - 1,
        )
    touch_agent(agent.pk)
    publish_event(
        "agent.connected", {"agent": agent.name, "role": agent.role, "version": version, "epoch": sync.epoch}
    )
    if listeners is not None:
        changed = {lid for lid in set(before) | set(listeners) if before.get(lid) != listeners.get(lid)}
        evaluate_listeners(changed, include_unsettled=False)
    return sync.epoch


def agent_disconnected(agent: AgentNode, epoch: int | None = None, reason: str = "") -> bool:
    """The connection of `epoch` closed. Only the agent's current connection marks it
    disconnected: a replaced one closing late must not. Returns whether it was the current one."""
    rows = AgentSync.objects.filter(agent=agent)
    if epoch is not None:
        rows = rows.filter(epoch=epoch)
    if not rows.update(connected=False, disconnected_at=timezone.now(), disconnect_reason=reason[:200]):
        return False
    publish_event("agent.disconnected", {"agent": agent.name, "role": agent.role, "reason": reason})
    if AgentSync.objects.filter(agent=agent).exclude(unhealthy={}).exists():
        # Its health votes no longer count: the majority may have changed.
        changed = refresh_tables(None)
        if changed:
            notify_agents(_bump_generation().generation)
            evaluate_listeners(changed)
    return True


def count_sync_event(agent_id: int, counter: str) -> None:
    """missed_notifications, lag_resends or stale_acks_ignored += 1 (shown on the agent API)."""
    AgentSync.objects.filter(agent_id=agent_id).update(**{counter: F(counter) + 1})


def record_applied(
    agent: AgentNode, applied: Applied, known: dict[int, int] | None = None, epoch: int | None = None
) -> dict[int, int] | None:
    """An agent's acknowledgement (or failure) of a document. `known` is what this connection
    acknowledged before (None: read it from the database); only listeners whose generation
    changed are written. `epoch`: the connection it came on (None: do not check). Returns what
    the agent now runs."""
    return record_applied_batch([(agent, applied, known, epoch)])[0]


# (agent, its ack, what its connection acknowledged before, the connection's epoch or None)
AppliedReport = tuple[AgentNode, Applied, "dict[int, int] | None", "int | None"]


def _current_reports(reports: list[AppliedReport]) -> tuple[list[AppliedReport], list[int]]:
    """Inside the recording transaction: lock the reporting agents' AgentSync rows (in id order,
    the order hellos lock them too) and keep the reports of their current connection. Returns
    (current reports, indexes of refused ones)."""
    checked = sorted({agent.pk for agent, _, _, epoch in reports if epoch is not None})
    if not checked:
        return reports, []
    epochs = dict(
        AgentSync.objects.select_for_update()
        .filter(agent_id__in=checked)
        .order_by("agent_id")
        .values_list("agent_id", "epoch")
    )
    kept, refused = [], []
    for index, report in enumerate(reports):
        agent, applied, _, epoch = report
        if epoch is None or epochs.get(agent.pk) == epoch:
            kept.append(report)
            continue
        refused.append(index)
        logger.info(
            "ignored agent %s's ack of generation %s from replaced connection epoch %s (current %s)",
            agent.name,
            applied.generation,
            epoch,
            epochs.get(agent.pk),
        )
    return kept, refused


def record_applied_batch(reports: list[AppliedReport]) -> list[dict[int, int] | None]:
    """Several acknowledgements (in arrival order) in one transaction and one status
    evaluation: the agents' acks of one push arrive within milliseconds of each other, and
    recording them one by one cost a transaction and an evaluation each. Reports from a
    connection that a newer hello replaced are ignored. Returns, per report, what that agent now
    runs (the `known` of its next report). Statuses are evaluated after the commit: two batches
    committing concurrently (two web workers) each evaluate after their own commit, so the
    later one sees both."""
    with transaction.atomic():
        current, refused = _current_reports(reports)
        results, after_commit = _record_current(current)
    after_commit()
    for index in refused:  # a replaced connection's consumer keeps what it knew; it is closing
        agent, _, known, _ = reports[index]
        count_sync_event(agent.pk, "stale_acks_ignored")
        results.insert(index, known)
    return results


def _record_current(reports: list[AppliedReport]) -> tuple[list[dict[int, int] | None], Any]:
    """The writes of record_applied_batch; returns the results and what to do after commit."""
    results: list[dict[int, int] | None] = []
    latest: dict[int, dict[int, int]] = {}  # agent -> what it runs, as of the reports so far
    rows: dict[tuple[int, int], tuple[int, str]] = {}  # (agent, listener) -> (generation, error)
    touched: dict[int, AgentNode] = {}
    failures: list[tuple[AgentNode, Applied]] = []
    failed: set[int] = set()  # agents whose last report in this batch is a failure: keep their error
    # Listeners an agent said it could not apply (their VIP refused): rewritten until it can.
    refusing = (
        {
            (a, li): e
            for a, li, e in AgentListenerAck.objects.filter(agent__in={a.pk for a, *_ in reports})
            .exclude(error="")
            .values_list("agent_id", "listener_id", "error")
        }
        if any(applied.ok for _, applied, *_ in reports)
        else {}
    )
    for agent, applied, known, _ in reports:
        if not applied.ok:
            AgentSync.objects.update_or_create(
                agent=agent, defaults={"error": applied.error or "", "error_generation": applied.generation}
            )
            touch_agent(agent.pk)
            failures.append((agent, applied))
            previous = latest.get(agent.pk, known)
            results.append(dict(previous) if previous is not None else None)
            failed.add(agent.pk)
            continue
        failed.discard(agent.pk)
        before = latest.get(agent.pk, known)
        if before is None:
            before = dict(
                AgentListenerAck.objects.filter(agent=agent).values_list("listener_id", "generation")
            )
        errors = applied.listener_errors
        for lid, gen in applied.listeners.items():
            error = errors.get(lid, "")
            if before.get(lid) != gen or error or (agent.pk, lid) in refusing:
                rows[(agent.pk, lid)] = (gen, error)
        latest[agent.pk] = dict(applied.listeners)
        agent.applied_generation, agent.last_seen = applied.generation, timezone.now()
        agent.applied_at = agent.last_seen
        touched[agent.pk] = agent
        results.append(latest[agent.pk])
    acks = [(agent_id, lid, gen, error) for (agent_id, lid), (gen, error) in rows.items()]
    cleared = 0
    if touched:
        acks = _write_acks(acks)
        # An agent that applied a document is no longer in error (which can settle other
        # listeners: every unsettled one is looked at after the commit).
        cleared = (
            AgentSync.objects.filter(agent__in=[pk for pk in touched if pk not in failed])
            .exclude(error="")
            .update(error="", error_generation=None)
        )
        AgentNode.objects.bulk_update(touched.values(), ["last_seen", "applied_generation", "applied_at"])

    def after_commit() -> None:
        for agent, applied in failures:
            logger.warning(
                "agent %s failed to apply generation %s: %s", agent.name, applied.generation, applied.error
            )
            publish_event(
                "agent.apply_failed",
                {"agent": agent.name, "generation": applied.generation, "error": applied.error},
            )
        if acks:
            evaluate_listeners({ack[1] for ack in acks}, include_unsettled=False)
        _report_refusals(touched, acks, refusing)
        if cleared or failures:
            evaluate_listeners([], include_unsettled=True)

    return results, after_commit


def _write_acks(acks: list[tuple[int, int, int, str]]) -> list[tuple[int, int, int, str]]:
    """Inside a transaction: upsert the rows of listeners that still exist (an agent may ack a
    listener deleted since). Returns the rows written. PostgreSQL: the foreign keys are checked
    at once (they are deferred to COMMIT otherwise, which would fail the whole batch) and a
    concurrent delete is caught in a savepoint; SQLite: the transaction holds the write lock,
    so filtering first is enough."""

    def live_only(rows: list[tuple[int, int, int, str]]) -> list[tuple[int, int, int, str]]:
        live = set(Listener.objects.filter(pk__in={row[1] for row in rows}).values_list("pk", flat=True))
        return [row for row in rows if row[1] in live]

    if not acks:
        return acks
    if connection.vendor != "postgresql":
        acks = live_only(acks)
        _upsert_acks(acks)
        return acks
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    try:
        with transaction.atomic():  # a savepoint: PostgreSQL aborts the transaction otherwise
            _upsert_acks(acks)
    except IntegrityError:  # a listener was deleted meanwhile (rare): write the others' rows
        acks = live_only(acks)
        _upsert_acks(acks)
    return acks


def _upsert_acks(acks: list[tuple[int, int, int, str]]) -> None:
    """(agent, listener, generation, error) rows, inserted or updated in one statement. Written
    as SQL because bulk_create(update_conflicts=True) wraps itself in a transaction: two more
    round trips on the acknowledgement path. PostgreSQL and SQLite (3.24+) share this syntax."""
    if not acks:
        return
    table = connection.ops.quote_name(AgentListenerAck._meta.db_table)
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    values = ", ".join(["(%s, %s, %s, %s, %s)"] * len(acks))
    params: list[Any] = []
    for agent_id, listener_id, generation, error in acks:
        params += [agent_id, listener_id, generation, error, now]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (agent_id, listener_id, generation, error, updated) "  # noqa: S608
            f"VALUES {values} ON CONFLICT (agent_id, listener_id) DO UPDATE "
            "SET generation = excluded.generation, error = excluded.error, updated = excluded.updated",
            params,
        )


def _report_refusals(
    agents: dict[int, AgentNode], acks: list[tuple[int, int, int, str]], before: dict[tuple[int, int], str]
) -> None:
    """Log and publish a listener an agent newly refused (or healed), once, not on every ack."""
    for agent_id, listener_id, generation, error in acks:
        if error == before.get((agent_id, listener_id), ""):
            continue
        name = agents[agent_id].name
        if error:
            logger.warning("agent %s cannot apply listener %s: %s", name, listener_id, error)
        else:
            logger.info("agent %s now runs listener %s at generation %s", name, listener_id, generation)
        publish_event(
            "agent.listener_refused" if error else "agent.listener_applied",
            {"agent": name, "listener": listener_id, "generation": generation, "error": error or None},
        )


def record_health(agent: AgentNode, health: Health) -> None:
    """Store an agent's backend verdicts; if the muxes' majority view changed, push new tables."""
    with transaction.atomic():
        sync, _ = AgentSync.objects.select_for_update().get_or_create(agent=agent)
        unhealthy = {} if health.full else dict(sync.unhealthy)
        touched = set()
        for check in health.checks:
            key = f"{check.listener}|{check.address}|{check.port}"
            touched.add(check.listener)
            if check.healthy:
                unhealthy.pop(key, None)
            else:
                unhealthy[key] = check.reason or "unhealthy"
        if health.full:
            touched |= {int(k.split("|")[0]) for k in sync.unhealthy}
        if unhealthy != sync.unhealthy:
            sync.unhealthy = unhealthy
            sync.save(update_fields=["unhealthy"])
        else:
            touched = set()
    touch_agent(agent.pk)
    if not touched:
        return
    changed = refresh_tables(touched)
    if changed:
        notify_agents(_bump_generation().generation)
    update_operating_status(touched)
    evaluate_listeners(changed)


# --- statuses -------------------------------------------------------------------------------------


def _muxes() -> list[dict[str, Any]]:
    rows = AgentNode.objects.filter(role=AgentRole.MUX, enabled=True).values("pk", "sync__error")
    return [{"pk": r["pk"], "error": r["sync__error"] or ""} for r in rows]


def evaluate_listeners(listener_ids: Iterable[int] | None, *, include_unsettled: bool = True) -> None:
    """Recompute provisioning_status of the given listeners (all when None), and of every
    listener not ACTIVE unless `include_unsettled` is False (the caller knows that only the
    given listeners can have changed: their own tables or acknowledgements).

    Read and write under the listeners' row locks (taken in id order), in one transaction: an
    evaluation that read before another agent's ack or a replace committed must not write its
    verdict after a later evaluation or the replace did. Unlocked, under the 40-client load
    (replaces holding a listener's lock for up to seconds while they wait for the push lock), a
    stale ACTIVE landed over a replace's PENDING_UPDATE, and then a stale PENDING_UPDATE over
    the last ack's evaluation (which, reading ACTIVE, wrote nothing): listeners stayed pending
    for good (docs/bench-load.md)."""
    with transaction.atomic():
        messages = _evaluate_locked(listener_ids, include_unsettled)
    if messages is None:
        return
    listener_messages, vip_ids = messages
    _send_all(listener_messages)  # the listeners' news first: the VIPs' needs two more queries
    _send_all(_update_vip_provisioning(vip_ids))


def _evaluate_locked(
    listener_ids: Iterable[int] | None, include_unsettled: bool
) -> tuple[list[tuple[str, dict[str, Any]]], set[int]] | None:
    if listener_ids is None:
        candidates = Listener.objects.all()
    elif include_unsettled:
        wanted = set(listener_ids)
        candidates = Listener.objects.filter(
            Q(pk__in=wanted) | ~Q(provisioning_status=ProvisioningStatus.ACTIVE)
        )
    else:
        candidates = Listener.objects.filter(pk__in=set(listener_ids))
    # The aggregate below cannot lock (no FOR UPDATE with GROUP BY): lock first, then read what
    # was committed before the locks were granted.
    list(candidates.select_for_update().order_by("pk").values_list("pk", flat=True))
    live_mux = Q(role=AgentRole.MUX, enabled=True)
    mux_count = (
        AgentNode.objects.filter(live_mux).order_by().values("role").annotate(n=Count("pk")).values("n")
    )
    # One query answers "how many live muxes run each listener's current table, out of how
    # many, and is any mux in error?": it is on the path of every acknowledgement.
    listeners = list(
        candidates.select_related("table", "vip")
        .only("id", "provisioning_status", "vip__id", "vip__tenant_id", "table__number")
        .annotate(
            acked=Count(
                "agent_acks",
                filter=Q(
                    agent_acks__agent__role=AgentRole.MUX,
                    agent_acks__agent__enabled=True,
                    agent_acks__generation__gte=F("table__number"),
                ),
            ),
            muxes=Subquery(mux_count[:1]),
            any_error=Exists(
                AgentSync.objects.filter(agent__role=AgentRole.MUX, agent__enabled=True).exclude(error="")
            ),
            refused=Exists(
                AgentListenerAck.objects.filter(
                    listener=OuterRef("pk"), agent__role=AgentRole.MUX, agent__enabled=True
                ).exclude(error="")
            ),
        )
    )
    if not listeners or not listeners[0].muxes:
        return None  # nothing to settle, or nobody to apply anything: leave the status pending
    erring: list[int] = []
    acks: dict[tuple[int, int], int] = {}
    if listeners[0].any_error:  # rare: which of the muxes still owing a listener failed to apply?
        erring = [m["pk"] for m in _muxes() if m["error"]]
        acks = {
            (a, li): g
            for a, li, g in AgentListenerAck.objects.filter(
                agent_id__in=erring, listener__in=[li.pk for li in listeners]
            ).values_list("agent_id", "listener_id", "generation")
        }
    updates: dict[str, list[int]] = {}
    messages: list[tuple[str, dict[str, Any]]] = []
    vip_ids = set()
    for listener in listeners:
        table = getattr(listener, "table", None)
        if table is None:
            continue
        if listener.acked >= listener.muxes:
            status = ProvisioningStatus.ACTIVE
        elif listener.refused or any(acks.get((pk, listener.pk), 0) < table.number for pk in erring):
            status = ProvisioningStatus.ERROR
        elif listener.provisioning_status == ProvisioningStatus.PENDING_CREATE:
            status = ProvisioningStatus.PENDING_CREATE
        else:
            status = ProvisioningStatus.PENDING_UPDATE
        if status != listener.provisioning_status:
            updates.setdefault(status, []).append(listener.pk)
            vip_ids.add(listener.vip_id)
            messages += event_messages(
                "listener.provisioning_status",
                {
                    "listener": listener.pk,
                    "vip": listener.vip_id,
                    "status": status,
                    "generation": table.number,
                },
                tenant_id=listener.vip.tenant_id,
                vip_id=listener.vip_id,
                listener_id=listener.pk,
            )
    for status, ids in updates.items():
        Listener.objects.filter(pk__in=ids).update(provisioning_status=status)
    return messages, vip_ids


def _update_vip_provisioning(vip_ids: set[int]) -> list[tuple[str, dict[str, Any]]]:
    if not vip_ids:
        return []
    vips: dict[int, tuple[int, str, set[str]]] = {}  # id -> tenant, its status, its listeners' statuses
    for vip_id, tenant_id, vip_status, status in Listener.objects.filter(vip_id__in=vip_ids).values_list(
        "vip_id", "vip__tenant_id", "vip__provisioning_status", "provisioning_status"
    ):
        vips.setdefault(vip_id, (tenant_id, vip_status, set()))[2].add(status)
    messages = []
    updates: dict[str, list[int]] = {}
    for vip_id, (tenant_id, vip_status, own) in vips.items():
        if own <= {ProvisioningStatus.ACTIVE}:
            status = ProvisioningStatus.ACTIVE
        elif ProvisioningStatus.ERROR in own:
            status = ProvisioningStatus.ERROR
        else:
            status = ProvisioningStatus.PENDING_UPDATE
        if status != vip_status:
            updates.setdefault(status, []).append(vip_id)
            messages += event_messages(
                "vip.provisioning_status",
                {"vip": vip_id, "status": status},
                tenant_id=tenant_id,
                vip_id=vip_id,
            )
    for status, ids in updates.items():
        Vip.objects.filter(pk__in=ids).update(provisioning_status=status)
    return messages


def update_operating_status(listener_ids: Iterable[int]) -> None:
    listeners = list(
        Listener.objects.filter(pk__in=list(listener_ids)).select_related("vip").prefetch_related("backends")
    )
    # Every backend change comes here: the muxes' votes are read only for a monitored listener.
    votes = _health_votes() if any(li.health_check for li in listeners) else []
    vip_ids = set()
    messages: list[tuple[str, dict[str, Any]]] = []
    for listener in listeners:
        serving = [b for b in listener.backends.all() if b.admin_state == BackendState.ACTIVE]
        down = _down_backends(listener.pk, votes)
        if not serving:
            status = OperatingStatus.OFFLINE
        elif not listener.health_check:
            status = OperatingStatus.NO_MONITOR
        else:
            failing = sum((b.address, b.port) in down for b in serving)
            status = (
                OperatingStatus.ONLINE
                if failing == 0
                else OperatingStatus.ERROR
                if failing == len(serving)
                else OperatingStatus.DEGRADED
            )
        if status != listener.operating_status:
            Listener.objects.filter(pk=listener.pk).update(operating_status=status)
            vip_ids.add(listener.vip_id)
            messages += event_messages(
                "listener.operating_status",
                {"listener": listener.pk, "status": status, "down": [f"{a}:{p}" for a, p in down]},
                tenant_id=listener.vip.tenant_id,
                vip_id=listener.vip_id,
                listener_id=listener.pk,
            )
    for vip in Vip.objects.filter(pk__in=vip_ids):
        statuses = set(vip.listeners.values_list("operating_status", flat=True))
        if statuses <= {OperatingStatus.ONLINE, OperatingStatus.NO_MONITOR}:
            status = OperatingStatus.ONLINE
        elif statuses == {OperatingStatus.ERROR}:
            status = OperatingStatus.ERROR
        elif statuses == {OperatingStatus.OFFLINE}:
            status = OperatingStatus.OFFLINE
        else:
            status = OperatingStatus.DEGRADED
        if status != vip.operating_status:
            Vip.objects.filter(pk=vip.pk).update(operating_status=status)
            messages += event_messages(
                "vip.operating_status",
                {"vip": vip.pk, "status": status},
                tenant_id=vip.tenant_id,
                vip_id=vip.pk,
            )
    _send_all(messages)


# --- signal wiring --------------------------------------------------------------------------------

_STATUS_ONLY_FIELDS = {"generation", "provisioning_status", "operating_status", "updated"}
_AGENT_BOOKKEEPING_FIELDS = {"last_seen", "applied_generation", "applied_at", "last_stats", "updated"}


def _on_generation(sender, generation: Generation, **kwargs) -> None:
    """In the transaction that writes the generation: the push is staged before that commit
    and sent right after it, with no transaction of its own on the REST call's path."""
    ids = [generation.listener_id]
    number, delta, changed = _stage(ids, [generation])

    def after_commit() -> None:
        _publish(number, delta, ids, changed)
        # A new backend list can change the listener's operating status on its own (none
        # serving -> OFFLINE, some -> NO_MONITOR/ONLINE...): without this, a listener with no
        # health check (so no health report to trigger it) kept its old status.
        update_operating_status(ids)

    transaction.on_commit(after_commit)


def _on_listener_saved(sender, instance: Listener, created: bool, update_fields=None, **kwargs) -> None:
    if update_fields is not None and set(update_fields) <= _STATUS_ONLY_FIELDS:
        return  # new_generation's bookkeeping save; generation_staged pushes that change
    schedule_change([instance.pk])
    if not created:
        transaction.on_commit(lambda: update_operating_status([instance.pk]))


def _on_deleted(sender, instance, **kwargs) -> None:
    schedule_change(everything=True)


def _on_vip_saved(sender, instance: Vip, created: bool, **kwargs) -> None:
    if created:
        schedule_change(everything=True)


def _on_agent_saved(sender, instance: AgentNode, update_fields=None, **kwargs) -> None:
    if update_fields is not None and set(update_fields) <= _AGENT_BOOKKEEPING_FIELDS:
        return
    agent_id = instance.pk
    # The consumer re-checks the token and enabled flag: a revoked agent is disconnected at once.
    transaction.on_commit(lambda: _group_send(agent_group(agent_id), {"type": "agent.recheck"}))
    schedule_change(everything=True)  # the mux set (ownership ring) may have changed


def _on_agent_deleted(sender, instance: AgentNode, **kwargs) -> None:
    agent_id = instance.pk
    transaction.on_commit(lambda: _group_send(agent_group(agent_id), {"type": "agent.recheck"}))
    schedule_change(everything=True)


def connect_signals() -> None:
    generation_staged.connect(_on_generation, dispatch_uid="agent_sync.generation")
    post_save.connect(_on_listener_saved, sender=Listener, dispatch_uid="agent_sync.listener_saved")
    post_delete.connect(_on_deleted, sender=Listener, dispatch_uid="agent_sync.listener_deleted")
    post_delete.connect(_on_deleted, sender=Vip, dispatch_uid="agent_sync.vip_deleted")
    post_save.connect(_on_vip_saved, sender=Vip, dispatch_uid="agent_sync.vip_saved")
    post_save.connect(_on_agent_saved, sender=AgentNode, dispatch_uid="agent_sync.agent_saved")
    post_delete.connect(_on_agent_deleted, sender=AgentNode, dispatch_uid="agent_sync.agent_deleted")


__all__ = ["apply_change", "connect_signals", "publish_event", "record_applied", "record_health"]
