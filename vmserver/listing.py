"""Big lists that stay cheap while the fleet changes: records are grouped in blocks of ids, and
each list (its JSON, its totals) is cached block by block.

A change touches one block, so after it only that block's part is rebuilt (up to BLOCK
records, well under a millisecond) instead of the whole list (tens of ms for 100,000 VMs,
during which the event loop answers nobody). A large list is never joined into one string:
it is returned as pieces, which the server writes out one slice at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar, Union

from .protocol import LARGE_REPLY

BLOCK = 1024  # ids per block

# JSON text, whole or as pieces to be written in order (see protocol.encode_ok).
Encoded = Union[bytes, tuple[bytes, ...]]


class _Record(Protocol):
    id: int


R = TypeVar("R", bound=_Record)
T = TypeVar("T")


class Blocks(Generic[R]):
    """Records in id order, grouped by ``id // BLOCK``; the views built on them follow every change."""

    def __init__(self) -> None:
        self.by_block: dict[int, list[R]] = {}  # in block order; each list in id order
        self._views: list[View[R, object]] = []

    def view(self, render: Callable[[list[R]], T]) -> View[R, T]:
        """A value computed from each block's records, and cached until that block changes."""
        view: View[R, T] = View(self, render)
        self._views.append(view)  # type: ignore[arg-type]
        return view

    def touch(self, record: R) -> None:
        """``record`` changed: forget what the views computed from its block."""
        block = record.id // BLOCK
        for view in self._views:
            view.forget(block)

    def add(self, record: R) -> None:
        block = record.id // BLOCK
        records = self.by_block.get(block)
        if records is None:
            last = next(reversed(self.by_block), None)
            self.by_block[block] = [record]
            if last is not None and block < last:  # ids only grow, but keep the order regardless
                self.by_block = dict(sorted(self.by_block.items()))
        elif records[-1].id < record.id:
            records.append(record)
        else:
            records.append(record)
            records.sort(key=lambda r: r.id)
        self.touch(record)

    def remove(self, record: R) -> None:
        block = record.id // BLOCK
        records = self.by_block[block]
        records.remove(record)
        if not records:
            del self.by_block[block]
        self.touch(record)

    def after(self, after_id: int) -> Iterator[R]:
        """The records with ids above ``after_id``, in id order."""
        first = after_id // BLOCK
        for block, records in self.by_block.items():
            if block < first:
                continue
            for record in records:
                if record.id > after_id:
                    yield record


class View(Generic[R, T]):
    __slots__ = ("_blocks", "_render", "_done", "_whole")

    def __init__(self, blocks: Blocks[R], render: Callable[[list[R]], T]) -> None:
        self._blocks = blocks
        self._render = render
        self._done: dict[int, T] = {}
        self._whole: Encoded | None = None  # json_array() of the whole list, until a change

    def forget(self, block: int) -> None:
        self._done.pop(block, None)
        self._whole = None

    def each(self) -> list[T]:
        """One value per block, in block order (rendered only where something changed)."""
        done, render = self._done, self._render
        out = []
        for block, records in self._blocks.by_block.items():
            value = done.get(block)
            if value is None:
                value = done[block] = render(records)
            out.append(value)
        return out

    def json_array(self) -> Encoded:
        """For a view whose blocks render to comma-joined JSON records: the whole JSON array."""
        if self._whole is None:
            self._whole = json_array(self.each())  # type: ignore[arg-type]
        return self._whole


def json_array(pieces: Iterable[bytes]) -> Encoded:
    """A JSON array from pieces that are each comma-joined elements (empty pieces are skipped);
    past LARGE_REPLY bytes, as pieces rather than copied into one string."""
    parts = [piece for piece in pieces if piece]
    if not parts:
        return b"[]"
    if sum(map(len, parts)) <= LARGE_REPLY:
        return b"[" + b",".join(parts) + b"]"
    out = [b"["]
    for piece in parts:
        out += (piece, b",")
    out[-1] = b"]"
    return tuple(out)


def json_list(items: Iterable[bytes]) -> bytes:
    """A JSON array of encoded elements, in one string (for pages and filtered lists)."""
    parts = list(items)
    if not parts:
        return b"[]"
    # The brackets go onto the first and last items, so that a big list is copied once, by the
    # join, instead of three times.
    parts[0] = b"[" + parts[0]
    parts[-1] += b"]"
    return b",".join(parts)


def joined(encoded: Encoded) -> bytes:
    """The whole text of an Encoded value (for callers that need one string: tests, the console)."""
    return encoded if type(encoded) is bytes else b"".join(encoded)
