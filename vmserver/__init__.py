"""vmserver: inventory and live presence of virtual machines over line-delimited JSON (protocol v1)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("vmserver")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

PROTOCOL_VERSION = 1
