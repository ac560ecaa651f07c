"""The closed set of protocol error codes and the exceptions that carry one to the wire."""

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


class StorageError(CommandError):
    """The database failed a read or write (nothing was changed), or cannot be used at all.

    Answered ``internal``; the message names the database and the cause, for the log only: the
    client hears that the storage failed, not where it lives.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL, message)

    def __repr__(self) -> str:
        return f"StorageError({self.message!r})"
