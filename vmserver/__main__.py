"""Command line: ``vmserver`` / ``python -m vmserver``. Exit 0 after a clean stop, 1 when it cannot start."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Sequence

from . import __version__, gc_tuning, limits
from .backends import mask_dsn
from .config import Config, parse_config
from .console import ServerConsole
from .errors import StorageError
from .presence import SERVER_ID
from .server import TLSConfigError, start_server

log = logging.getLogger("vmserver")


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(config: Config) -> int:
    # Signals first, so a SIGINT/SIGTERM at any moment after this is a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config.http_port is not None:
        try:
            import aiohttp  # noqa: F401
            import prometheus_client  # noqa: F401  (GET /metrics)
        except ImportError as exc:
            log.error("cannot start: --http-port needs aiohttp and prometheus-client (%s): "
                      "pip install 'vmserver[http]'", exc)
            return 1
    limits.raise_fd_limit()  # each session is a descriptor; the server sizes its cap from this
    try:
        server = await start_server(config)
    except StorageError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except TLSConfigError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        address = getattr(exc, "vmserver_address", None) or _show(config.host, config.port)
        log.error("cannot start: %s (address %s, db %s)", exc, address, mask_dsn(config.db))
        return 1
    # The loaded inventory lives as long as the server, and so do most sessions: keep the cyclic
    # GC from walking them (a full collection over 100,000 VMs stalls the loop for ~90 ms).
    pauses = gc_tuning.PauseWatch()
    pauses.install()
    gc.freeze()
    freezer = loop.create_task(gc_tuning.keep_frozen())
    host, port = server.address
    extras = [name for name, on in (("TLS", config.tls_cert), ("token required", config.token),
                                    ("passwords required", config.require_passwords)) if on]
    extras.append(f"up to {server.max_sessions} sessions + {config.local_reserve} local")
    log.info("vmserver %s listening on %s (server id %s; db: %s%s)", __version__, _show(host, port), SERVER_ID,
             server.inventory.store.label, "".join(f"; {e}" for e in extras))
    if server.http is not None:
        http_host, http_port = server.http.address
        log.info("HTTP API on %s://%s (sessions end after %gs without a request)",
                 "https" if config.tls_cert else "http", _show(http_host, http_port), config.http_session_ttl)
    console = None
    if config.console:
        if sys.stdin.isatty():
            console = ServerConsole(server.context, server.inventory)
            console.start()
        else:
            log.warning("--console ignored: stdin is not a terminal")
    await stop.wait()
    log.info("shutting down: finishing commands in flight")
    if console is not None:
        console.stop()
    await server.close()
    freezer.cancel()
    server.inventory.close()
    pauses.remove()
    log.info("%s", pauses.summary())
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["copy"]:
        from .copy import main as copy
        return copy(args[1:])
    config = parse_config(args)
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler was installed
        return 0


if __name__ == "__main__":
    sys.exit(main())
