"""vmclient: asyncio client library for vmserver (protocol v1), plus its console and fleet demo.

::

    async with vmclient.Client("127.0.0.1", 8888) as c:
        vm = await c.add_vm("vm-1", ram=2048, cpu=2, disks=[{"disk_id": "disk-1", "size": 500}])

    vmclient.Client(hosts=["10.0.0.1:8888", "10.0.0.2:8888"])  # tried in turn, the last good first

See :mod:`vmclient.errors` for the error hierarchy. This package does not import vmserver.
"""

from .client import DEFAULT_PORT, EVENT_NAMES, VM, Client, Disk, DiskSpec, Event, connect, parse_address
from .errors import (
    AlreadyExists, AuthFailed, BadRequest, CallTimeout, ClientError, CommandError, Conflict, ConnectError,
    ConnectionLost, InternalError, InvalidArgs, NotAuthorized, NotConnected, NotFound, ProtocolViolation,
    TooLarge, Unauthenticated, Unavailable, UnknownCommand,
)

__all__ = [
    "DEFAULT_PORT", "EVENT_NAMES", "Client", "connect", "parse_address", "VM", "Disk", "DiskSpec", "Event",
    "ClientError", "ConnectError", "ConnectionLost", "CallTimeout", "ProtocolViolation", "CommandError",
    "BadRequest", "TooLarge", "UnknownCommand", "InvalidArgs", "NotFound", "AlreadyExists", "Conflict",
    "NotConnected", "NotAuthorized", "AuthFailed", "Unauthenticated", "Unavailable", "InternalError",
]
