"""Load-balancing API: tenants' VIPs, listeners and backends; operators' pools and agent nodes."""

from __future__ import annotations

import re

from django.db import transaction
from django.db.models import Q
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from datacenter.api.viewsets import (
    OperatorViewSet,
    OperatorWriteViewSet,
    TenantScopedReadOnlyViewSet,
    TenantScopedViewSet,
)
from datacenter.events.services import record_change, snapshot
from datacenter.services_errors import FieldErrors
from datacenter.tenancy.api.rotation import GRACE_PARAM, grace_seconds
from datacenter.tenancy.models import RetiredKey
from datacenter.tenancy.scoping import is_operator, tenant_ids_for

from .. import services, vip_list_cache
from ..bucket_movement import bucket_movement, current_table_size
from ..filtersets import (
    AgentNodeFilterSet,
    BackendFilterSet,
    GenerationFilterSet,
    ListenerFilterSet,
    VipFilterSet,
    VipPoolFilterSet,
)
from ..models import AgentNode, Backend, Generation, Listener, Vip, VipPool
from . import serializers

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
ETAG_NUMBER = re.compile(r'^(?:W/)?"?(\d{1,18})"?$')

DRY_RUN_PARAM = OpenApiParameter(
    "dry_run", OpenApiTypes.BOOL, description="Validate and return the diff only."
)
EXPECTED_GENERATION_PARAM = OpenApiParameter(
    "expected_generation",
    OpenApiTypes.INT,
    description="Generation you last saw; if the listener moved on the answer is 409.",
)
IF_MATCH_PARAM = OpenApiParameter(
    "If-Match",
    OpenApiTypes.STR,
    location=OpenApiParameter.HEADER,
    description='ETag of the backend list you last saw (e.g. "5"); if stale the answer is 412.',
)


def parse_bool_param(request, name: str) -> bool:
    raw = request.query_params.get(name, "").strip().lower()
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise ValidationError({name: [f"{raw!r} is not a boolean; use true or false."]})


def parse_preconditions(request, body_value=None) -> tuple[int | None, bool]:
    """(expected generation, came from If-Match) from If-Match, the body, or ?expected_generation=.
    The query parameter is validated even when If-Match wins, so a malformed one is always a 400."""
    raw = request.query_params.get("expected_generation")
    query_value = None
    if raw is not None and raw != "":
        if not re.fullmatch(r"[0-9]{1,18}", raw):  # ASCII digits: str.isdigit() also takes "²"
            raise ValidationError({"expected_generation": [f"{raw!r} is not a non-negative integer."]})
        query_value = int(raw)
    if_match = request.headers.get("If-Match")
    if if_match is not None:
        match = ETAG_NUMBER.match(if_match.strip())
        if not match:
            raise ValidationError({"If-Match": [f'{if_match!r} is not a generation ETag like "5".']})
        return int(match.group(1)), True
    if body_value is not None:
        return body_value, False
    return query_value, False


def backend_list_body(listener: Listener, result=None) -> dict:
    body = {
        "listener": listener.pk,
        "generation": result.generation_number if result else listener.generation,
        "backends": result.backends if result else services.current_backends(listener),
    }
    if result is not None:
        body.update({"dry_run": result.dry_run, "changed": result.changed, "diff": result.diff})
    return body


def with_etag(response: Response, generation: int) -> Response:
    response["ETag"] = f'"{generation}"'
    return response


class VipPoolViewSet(OperatorWriteViewSet):
    """Operators define address ranges; tenants read the pools they may allocate from."""

    queryset = VipPool.objects.prefetch_related("tenants")
    serializer_class = serializers.VipPoolSerializer
    filterset_class = VipPoolFilterSet
    ordering_fields = ["name", "created"]

    def get_queryset(self):
        queryset = super().get_queryset()
        if is_operator(self.request.user):
            return queryset
        ids = tenant_ids_for(self.request.user)
        # Subquery instead of a join: no duplicate rows, no DISTINCT over the prefetch.
        allowed = VipPool.objects.filter(Q(shared=True) | Q(tenants__in=ids)).values("pk")
        return queryset.filter(pk__in=allowed)


class VipViewSet(TenantScopedViewSet):
    queryset = Vip.objects.all()  # the serializer reads tenant_id and pool_id only: no join needed
    serializer_class = serializers.VipSerializer
    filterset_class = VipFilterSet
    ordering_fields = ["name", "address", "created"]
    FIXED = ("tenant", "pool", "address")
    values_list_rendering = True  # False: the list goes through VipSerializer (the tests compare)

    def list(self, request, *args, **kwargs):
        """The same body as ModelViewSet.list, from the per-process cache while the caller's
        tenants' VIPs have not changed (vip_list_cache.py), else rendered from `.values()` rows
        (issue 15: the VIP list is most of the API's load; see serializers.vip_list_items)."""
        key = None
        if vip_list_cache.enabled() and not is_operator(request.user):
            key = vip_list_cache.cache_key(request, tenant_ids_for(request.user))
        if key is None:
            return self._list(request, *args, **kwargs)
        read_under = vip_list_cache.versions(key[0])  # before the rows: see the module's doc
        body = vip_list_cache.cache.get(key, read_under)
        if body is not None:
            return Response(body)
        response = self._list(request, *args, **kwargs)
        if response.status_code == status.HTTP_200_OK:
            vip_list_cache.cache.put(key, read_under, response.data)
        return response

    def _list(self, request, *args, **kwargs):
        serializer = self.get_serializer()
        if not self.values_list_rendering or list(serializer.fields) != serializers.VIP_LIST_FIELDS:
            return super().list(request, *args, **kwargs)
        rows = self.filter_queryset(self.get_queryset()).values(*serializers.VIP_LIST_COLUMNS)
        page = self.paginate_queryset(rows)
        if page is None:
            return Response(serializers.vip_list_items(rows, serializer))
        return self.get_paginated_response(serializers.vip_list_items(page, serializer))

    def perform_create(self, serializer):
        data = serializer.validated_data
        self.require_write(data["tenant"].pk)
        serializer.instance = services.create_vip(
            tenant=data["tenant"],
            name=data["name"],
            pool=data.get("pool"),
            address=data.get("address"),
            description=data.get("description", ""),
            user=self.request.user,
        )

    def perform_update(self, serializer):
        vip = serializer.instance
        data = serializer.validated_data
        errors = {
            name: ["cannot be changed after the VIP is created."]
            for name in self.FIXED
            if name in data and data[name] is not None and data[name] != getattr(vip, name)
        }
        if errors:
            raise FieldErrors(errors)
        changes = {k: v for k, v in data.items() if k in ("name", "description")}
        serializer.instance = services.update_vip(vip, user=self.request.user, **changes)

    def perform_destroy(self, instance):
        services.delete_vip(instance, user=self.request.user)


class ListenerViewSet(TenantScopedViewSet):
    queryset = Listener.objects.select_related("vip")
    serializer_class = serializers.ListenerSerializer
    filterset_class = ListenerFilterSet
    tenant_field = "vip__tenant"
    ordering_fields = ["port", "created"]

    def perform_create(self, serializer):
        data = dict(serializer.validated_data)
        vip = data.pop("vip")
        self.require_write(vip.tenant_id)
        serializer.instance = services.create_listener(vip=vip, user=self.request.user, **data)

    def perform_update(self, serializer):
        listener = serializer.instance
        data = dict(serializer.validated_data)
        vip = data.pop("vip", None)
        if vip is not None and vip.pk != listener.vip_id:
            raise FieldErrors({"vip": ["cannot be changed on an existing listener."]})
        serializer.instance = services.update_listener(listener, user=self.request.user, **data)

    def perform_destroy(self, instance):
        services.delete_listener(instance, user=self.request.user)

    @extend_schema(methods=["GET"], responses=serializers.BackendListStateSerializer)
    @extend_schema(
        methods=["PUT"],
        request=serializers.BackendListSerializer,
        responses=serializers.BackendListStateSerializer,
        parameters=[DRY_RUN_PARAM, EXPECTED_GENERATION_PARAM, IF_MATCH_PARAM],
        description=(
            "Replace the listener's whole ordered backend list. A change makes a new generation; "
            "`dry_run=true` only returns the diff. Send the generation you last saw (If-Match: 412, "
            "or `expected_generation`: 409) to avoid overwriting someone else's change."
        ),
    )
    @action(
        detail=True, methods=["get", "put"], url_path="backends", filterset_class=None, pagination_class=None
    )
    def backends(self, request, pk=None):
        listener = self.get_object()
        if request.method == "GET":
            return with_etag(Response(backend_list_body(listener)), listener.generation)
        body = serializers.BackendListSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        dry_run = parse_bool_param(request, "dry_run")
        expected, via_if_match = parse_preconditions(request, body.validated_data.get("expected_generation"))
        result = services.replace_backends(
            listener,
            body.validated_data["backends"],
            user=request.user,
            expected_generation=expected,
            via_if_match=via_if_match,
            dry_run=dry_run,
        )
        body = backend_list_body(result.listener, result)
        if dry_run:  # scripts see what the dashboard's preview shows: the share of new flows that move
            body["bucket_movement"] = bucket_movement(
                services.current_backends(result.listener), result.backends, current_table_size()
            )
        return with_etag(Response(body), result.generation_number)


def _backend_item(data: dict) -> dict:
    return {key: data[key] for key in services.BACKEND_FIELDS if key in data}


def _unprefixed(errors: FieldErrors) -> FieldErrors:
    """backends[3].weight -> weight: a single-backend call reports the fields of that backend
    (a conflict stays a conflict: same class)."""
    return type(errors)(
        {
            re.sub(r"^backends\[\d+\]\.?", "", key) or "non_field_errors": msgs
            for key, msgs in errors.errors.items()
        }
    )


class BackendViewSet(TenantScopedViewSet):
    """Single backends. Each write is a whole-list replace: it makes a generation like PUT .../backends/."""

    queryset = Backend.objects.select_related("listener__vip", "host")
    serializer_class = serializers.BackendSerializer
    filterset_class = BackendFilterSet
    tenant_field = "listener__vip__tenant"
    ordering_fields = ["position", "address", "created"]

    @extend_schema(parameters=[EXPECTED_GENERATION_PARAM, IF_MATCH_PARAM])
    def create(self, request, *args, **kwargs):
        return super().create(request, *args, **kwargs)

    @extend_schema(parameters=[EXPECTED_GENERATION_PARAM, IF_MATCH_PARAM])
    def update(self, request, *args, **kwargs):
        return super().update(request, *args, **kwargs)

    @extend_schema(parameters=[EXPECTED_GENERATION_PARAM, IF_MATCH_PARAM])
    def partial_update(self, request, *args, **kwargs):
        return super().partial_update(request, *args, **kwargs)

    @extend_schema(parameters=[EXPECTED_GENERATION_PARAM, IF_MATCH_PARAM])
    def destroy(self, request, *args, **kwargs):
        return super().destroy(request, *args, **kwargs)

    def _replace(self, call, *args):
        expected, via_if_match = parse_preconditions(self.request)
        try:
            return call(
                *args, user=self.request.user, expected_generation=expected, via_if_match=via_if_match
            )
        except FieldErrors as exc:
            raise _unprefixed(exc) from exc

    def perform_create(self, serializer):
        data = dict(serializer.validated_data)
        listener = data.pop("listener")
        self.require_write(listener.vip.tenant_id)
        backend, _ = self._replace(services.add_backend, listener, _backend_item(data))
        serializer.instance = backend

    def perform_update(self, serializer):
        backend = serializer.instance
        data = dict(serializer.validated_data)
        listener = data.pop("listener", None)
        if listener is not None and listener.pk != backend.listener_id:
            raise FieldErrors({"listener": ["cannot be changed; remove the backend and add it elsewhere."]})
        updated, _ = self._replace(services.update_backend, backend, _backend_item(data))
        serializer.instance = Backend.objects.select_related("listener__vip", "host").get(pk=updated.pk)

    def perform_destroy(self, instance):
        self._replace(services.remove_backend, instance)


class GenerationViewSet(TenantScopedReadOnlyViewSet):
    """Immutable history of every listener's backend list."""

    queryset = Generation.objects.select_related("listener__vip")
    serializer_class = serializers.GenerationSerializer
    filterset_class = GenerationFilterSet
    tenant_field = "listener__vip__tenant"
    ordering_fields = ["number", "created"]


class AgentNodeViewSet(OperatorViewSet):
    """Operators register agents; the create and rotate-token answers carry the token, once."""

    queryset = AgentNode.objects.select_related("host", "sync")
    serializer_class = serializers.AgentNodeSerializer
    filterset_class = AgentNodeFilterSet
    ordering_fields = ["name", "last_seen"]

    @extend_schema(responses={201: serializers.AgentNodeWithTokenSerializer})
    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        node = AgentNode(**serializer.validated_data)
        body = self._issue_token(request, node, action="create")
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, parameters=[GRACE_PARAM], responses=serializers.AgentNodeWithTokenSerializer)
    @action(detail=True, methods=["post"], url_path="rotate-token", filterset_class=None)
    def rotate_token(self, request, pk=None):
        node = self.get_object()
        grace_s = grace_seconds(request)
        with transaction.atomic():  # the old key stays valid for the grace window (0: revoked now)
            RetiredKey.retire(RetiredKey.Kind.AGENT, node.pk, node.token_hash, grace_s)
        body = self._issue_token(
            request, node, action="rotate_token", update_fields=["token_lookup", "token_hash", "updated"]
        )
        return Response(body)

    def _issue_token(self, request, node: AgentNode, *, action: str, update_fields=None) -> dict:
        """Give `node` a new token, save and audit it; the answer is the only place the key appears."""
        with transaction.atomic():
            key = node.set_new_token()
            node.save(update_fields=update_fields)
            record_change(
                user=request.user,
                action=action,
                obj=node,
                tenant_id=None,
                before=None,
                after=_agent_snapshot(node),
            )
        body = serializers.AgentNodeWithTokenSerializer(node, context=self.get_serializer_context()).data
        body["token"] = key
        return body


def _agent_snapshot(node: AgentNode) -> dict:
    data = snapshot(node)
    data.pop("token_hash", None)
    return data
