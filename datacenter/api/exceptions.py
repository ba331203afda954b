"""One error shape for the API: DRF's, plus domain errors from services mapped to HTTP codes.

A validation error made only of these kinds of message gets their status, with DRF's body: a
reference to an object that does not exist (or that the caller cannot see) is 404, a unique
value already taken is 409 (a conflict with the current state, like a protected object); with
both, 404. Any other validation error stays 400.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError
from django.db.models import ProtectedError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from datacenter.services_errors import DomainError

STATUS_BY_VALIDATION_CODE = {"unique": status.HTTP_409_CONFLICT, "does_not_exist": status.HTTP_404_NOT_FOUND}


def _leaf_codes(codes) -> set[str]:
    if isinstance(codes, dict):
        return set().union(*(_leaf_codes(value) for value in codes.values())) if codes else set()
    if isinstance(codes, list):
        return set().union(*(_leaf_codes(value) for value in codes)) if codes else set()
    return {str(codes)}


def exception_handler(exc, context):
    if isinstance(exc, exceptions.ValidationError):
        response = drf_exception_handler(exc, context)
        kinds = _leaf_codes(exc.get_codes())
        if response is not None and kinds and kinds <= STATUS_BY_VALIDATION_CODE.keys():
            # both kinds at once: the unknown reference first (fixing it may change the rest)
            kind = "does_not_exist" if "does_not_exist" in kinds else "unique"
            response.status_code = STATUS_BY_VALIDATION_CODE[kind]
        return response
    if isinstance(exc, DataError) and "NUL" in str(exc):
        # A NUL character that no field validator stopped (a slug lookup, a JSON field): the
        # request is invalid, PostgreSQL just noticed first.
        return Response({"detail": "NUL characters are not allowed.", "code": "invalid"},
                        status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, DomainError):
        return Response(exc.as_response_body(), status=exc.http_status)
    if isinstance(exc, DjangoValidationError):
        body = exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}
        return Response(body, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, ProtectedError):
        names = sorted({str(obj) for obj in list(exc.protected_objects)[:5]})
        return Response(
            {"detail": f"Cannot delete: still used by {', '.join(names)}.", "code": "protected"},
            status=status.HTTP_409_CONFLICT,
        )
    return drf_exception_handler(exc, context)
