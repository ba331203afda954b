"""Errors raised by domain services (any app) and how the API reports them."""

from __future__ import annotations


class DomainError(Exception):
    http_status = 400
    code = "invalid"

    def as_response_body(self) -> dict:
        return {"detail": str(self), "code": self.code}


class FieldErrors(DomainError):
    """Validation failed; `errors` maps a field path (e.g. "backends[2].port") to messages."""

    code = "invalid"

    def __init__(self, errors: dict[str, list[str]]):
        self.errors = {field: list(messages) for field, messages in errors.items()}
        super().__init__("; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in self.errors.items()))

    def as_response_body(self) -> dict:
        return dict(self.errors)


class FieldConflict(FieldErrors):
    """A well-formed value that conflicts with the object's current state (409, by field): which
    values conflict depends on what is stored, not on the request, so a client cannot tell from
    the schema (e.g. a backend cap below the listener's backends)."""

    http_status = 409
    code = "conflict"


class QuotaExceeded(DomainError):
    http_status = 403
    code = "quota_exceeded"

    def __init__(self, quota: str, limit: int, requested: int, message: str):
        self.quota, self.limit, self.requested = quota, limit, requested
        super().__init__(message)

    def as_response_body(self) -> dict:
        return {
            "detail": str(self),
            "code": self.code,
            "quota": self.quota,
            "limit": self.limit,
            "requested": self.requested,
        }


class StaleGeneration(DomainError):
    """The client's view of the listener is outdated. 409 for a body/query precondition, 412 for If-Match."""

    code = "stale_generation"

    def __init__(self, expected: int, current: int, *, via_if_match: bool = False):
        self.expected, self.current = expected, current
        self.http_status = 412 if via_if_match else 409
        super().__init__(
            f"Listener is at generation {current}, but the request expected generation {expected}; "
            "fetch the backends again and retry."
        )

    def as_response_body(self) -> dict:
        return {
            "detail": str(self),
            "code": self.code,
            "expected_generation": self.expected,
            "current_generation": self.current,
        }
