"""API-wide endpoints: a trivial status check (also the benchmark's baseline), and the JSON 404."""

from django.http import JsonResponse
from django.views.defaults import page_not_found
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


def api_not_found(request, exception=None):
    """handler404: under /api/ a JSON body like every other API error (clients parse it); the
    dashboard keeps Django's page."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found.", "code": "not_found"}, status=404)
    return page_not_found(request, exception)
