"""The event feed: every change the inventory applies, told to this process's listeners.

A listener is called as ``listener(event, vm_id, data)``, where ``data()`` is the event's JSON
(made once, on first call), in the order the changes were applied. Today every change is made
by this process; in a cluster, changes read from the database come through the same door.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

Listener = Callable[[str, str, Callable[[], bytes]], None]


class EventFeed:
    def __init__(self) -> None:
        self.listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def publish(self, event: str, vm_id: str, data: Callable[[], bytes]) -> None:
        for listener in self.listeners:
            try:
                listener(event, vm_id, data)
            except Exception:  # a broken listener must not undo or block a change
                log.exception("event listener failed on %s %s", event, vm_id)
