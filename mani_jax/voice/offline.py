"""Prove "zero network": refuse every internet socket in this process.

``forbid_network()`` replaces ``socket.socket`` with a subclass whose constructor raises for ``AF_INET`` /
``AF_INET6`` (Unix-domain sockets, used by nothing in VAANI, stay allowed) and makes ``socket.getaddrinfo`` and
``socket.create_connection`` raise too. Used by ``python -m experiments.vaani`` (unless ``--allow-network``) and by
the tests, so a stage that tried to reach the network would fail loudly instead of silently depending on it.
"""
from __future__ import annotations

import contextlib
import socket


class NetworkAccessError(RuntimeError):
    """Raised when code tries to open an internet socket while the network is forbidden."""


_ORIGINAL = {"socket": socket.socket, "getaddrinfo": socket.getaddrinfo,
             "create_connection": socket.create_connection}


class _GuardedSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):  # noqa: A002 - socket's own signature
        if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
            raise NetworkAccessError("network access is disabled in this process (VAANI runs offline)")
        super().__init__(family, type, proto, fileno)


def _refuse(*args, **kwargs):
    raise NetworkAccessError("network access is disabled in this process (VAANI runs offline)")


def forbid_network():
    """Refuse internet sockets from now on (idempotent). Undo with :func:`allow_network`."""
    socket.socket = _GuardedSocket
    socket.getaddrinfo = _refuse
    socket.create_connection = _refuse


def allow_network():
    socket.socket = _ORIGINAL["socket"]
    socket.getaddrinfo = _ORIGINAL["getaddrinfo"]
    socket.create_connection = _ORIGINAL["create_connection"]


@contextlib.contextmanager
def no_network():
    """``with no_network(): ...`` -- internet sockets raise :class:`NetworkAccessError` inside the block."""
    was_guarded = socket.socket is _GuardedSocket
    forbid_network()
    try:
        yield
    finally:
        if not was_guarded:
            allow_network()
