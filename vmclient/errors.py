"""Errors raised by the client library.

::

    ClientError
     +-- ConnectError        cannot connect (``__cause__`` keeps the OSError; with several
                             addresses, ``.attempts`` keeps each one's ConnectError)
     +-- ConnectionLost      the connection dropped; every pending and later call fails with it
     +-- CallTimeout         a call's ``timeout=`` ran out, sending included (also a TimeoutError)
     +-- ProtocolViolation   the server sent something protocol v1 does not allow (it ends the
                             connection: the ``__cause__`` of the calls' ConnectionLost)
     +-- CommandError        the server answered with an error (``.code``, ``.message``, ``.request``)
          +-- BadRequest, TooLarge, UnknownCommand, InvalidArgs, NotFound, AlreadyExists,
              Conflict, NotConnected, NotAuthorized, AuthFailed, Unauthenticated,
              Unavailable, InternalError
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of every error this library raises."""


class ConnectError(ClientError):
    """The server could not be reached or did not greet as a vmserver.

    :ivar attempts: when a client with several addresses tried them all, each one's
        ConnectError in the order tried (the message names each too); else empty.
    """

    attempts: tuple[ConnectError, ...] = ()


class ConnectionLost(ClientError):
    """The connection ended while calls were pending, or a call was made on a closed client or
    one whose connection was lost (``connect()`` makes a new one). ``__cause__`` says why: an
    OSError, or the :class:`ProtocolViolation` that made the client end it."""


class CallTimeout(ClientError, TimeoutError):
    """The call did not complete within its timeout, which covers sending as well as waiting
    for the reply. The connection stays usable (see ``Client.request``)."""


class ProtocolViolation(ClientError):
    """The server sent a line this library cannot make sense of (not JSON, nested too deep, a
    malformed reply or event, a reply nobody waits for, a line over ``max_reply``). The client
    ends the connection; calls get it as the ``__cause__`` of their ConnectionLost."""


class CommandError(ClientError):
    """The server answered the request with an error.

    :ivar code: the protocol error code, e.g. ``"not_found"``
    :ivar message: the server's text for people
    :ivar request: what was sent: ``{"cmd": ..., "args": ...}`` with any password masked
    """

    code = ""

    def __init__(self, code: str, message: str, request: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request = request or {}


class BadRequest(CommandError):
    code = "bad_request"


class TooLarge(CommandError):
    code = "too_large"


class UnknownCommand(CommandError):
    code = "unknown_command"


class InvalidArgs(CommandError):
    code = "invalid_args"


class NotFound(CommandError):
    code = "not_found"


class AlreadyExists(CommandError):
    code = "already_exists"


class Conflict(CommandError):
    code = "conflict"


class NotConnected(CommandError):
    code = "not_connected"


class NotAuthorized(CommandError):
    code = "not_authorized"


class AuthFailed(CommandError):
    code = "auth_failed"


class Unauthenticated(CommandError):
    """The server has a token and this session has not presented it (``Client(token=...)``)."""

    code = "unauthenticated"


class Unavailable(CommandError):
    """The server cannot serve this now (for example: too many connections)."""

    code = "unavailable"


class InternalError(CommandError):
    code = "internal"


ERROR_CLASSES: dict[str, type[CommandError]] = {
    cls.code: cls
    for cls in (BadRequest, TooLarge, UnknownCommand, InvalidArgs, NotFound, AlreadyExists,
                Conflict, NotConnected, NotAuthorized, AuthFailed, Unauthenticated, Unavailable,
                InternalError)
}


def error_for(code: str, message: str, request: dict[str, Any] | None = None) -> CommandError:
    """The CommandError subclass for ``code`` (plain CommandError for a code this version does not know)."""
    return ERROR_CLASSES.get(code, CommandError)(code, message, request)
