"""Server-rendered pages (the live dashboard comes later): a landing page that links the API."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from datacenter.tenancy.scoping import is_operator, tenants_for


def landing(request: HttpRequest) -> HttpResponse:
    context = {}
    if request.user.is_authenticated:
        context = {"tenants": list(tenants_for(request.user)[:50]), "operator": is_operator(request.user)}
    return render(request, "frontend/landing.html", context)
