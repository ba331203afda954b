"""The libvirt binding, imported in one place so the portal starts without it.

libvirt-python compiles against the host's libvirt (Debian's libvirt-dev), which `make test` and
`make run` install when they can. A portal without it still serves everything else; a conversion
then fails at its first libvirt call with the reason below instead of the portal failing to start.
"""

from __future__ import annotations

from typing import Any

MISSING_REASON = (
    "the libvirt Python binding is not installed (libvirt-python; `make deps` builds it against "
    "Debian's libvirt-dev)"
)


class _MissingBinding:
    def __init__(self, error: ImportError):
        self._error = error

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"{MISSING_REASON}: {self._error}")


try:
    import libvirt
except ImportError as exc:  # pragma: no cover - exercised only where the binding is absent
    libvirt = _MissingBinding(exc)
    AVAILABLE = False
else:
    AVAILABLE = True
    # libvirt prints every error to stderr by default, even the ones we expect and handle (a
    # lookup of a name that must not exist yet); they still raise libvirtError, which we act on.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

__all__ = ["AVAILABLE", "MISSING_REASON", "libvirt"]
