"""API-wide endpoints: a trivial status check (also the benchmark's baseline)."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from datacenter.tenancy.permissions import IsAuthenticatedWithTokenScope


class StatusView(APIView):
    permission_classes = [IsAuthenticatedWithTokenScope]

    @extend_schema(responses=inline_serializer("Status", {"status": serializers.CharField()}))
    def get(self, request):
        return Response({"status": "ok"})
