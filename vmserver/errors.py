"""The closed set of protocol error codes and the exception that carries one to the wire."""

from enum import Enum


class ErrorCode(str, Enum):
    """Every error code the server may send; protocol.md documents when each happens."""

    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    UNKNOWN_COMMAND = "unknown_command"
    INVALID_ARGS = "invalid_args"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    CONFLICT = "conflict"
    NOT_CONNECTED = "not_connected"
    NOT_AUTHORIZED = "not_authorized"
    AUTH_FAILED = "auth_failed"
    UNAUTHENTICATED = "unauthenticated"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CommandError(Exception):
    """A request failed in a way the client should hear about; becomes an error reply line."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"CommandError({self.code.value!r}, {self.message!r})"
