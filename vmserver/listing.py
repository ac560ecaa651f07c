"""Big lists that stay cheap while the fleet changes: records are grouped in blocks of ids, and
each list (its JSON, its totals) is cached block by block.

A change touches one block, so after it only that block's part is rebuilt (up to BLOCK
records, well under a millisecond) instead of the whole list (tens of ms for 100,000 VMs,
during which the event loop answers nobody). A large list is never joined into one string:
it is returned as pieces, which the server writes out one slice at a time. Filtered lists and
pages are lists of references to each record's cached JSON (8 bytes a record), joined a slice
at a time as the peer reads (:class:`Join`): a client that does not read costs no copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar, Union

from .protocol import LARGE_REPLY

BLOCK = 1024  # ids per block
JOIN_CHUNK = 256  # records joined into one piece of a Join (tens of KB)


class Join:
    """Encoded records to be written comma-separated, joined ``JOIN_CHUNK`` at a time.

    Holds only references to the records' (immutable, shared) JSON, taken at one moment: a
    consistent snapshot that costs 8 bytes a record until it is written.
    """

    __slots__ = ("items",)

    def __init__(self, items: list[bytes]) -> None:
        self.items = items

    def chunks(self) -> Iterator[bytes]:
        items = self.items
        for start in range(0, len(items), JOIN_CHUNK):
            part = items[start:start + JOIN_CHUNK]
            if start:
                part.insert(0, b"")  # the comma between this chunk and the last, without a copy
            yield b",".join(part)


# JSON text, whole or as pieces to be written in order (see protocol.encode_ok); a piece may
# be a Join.
Encoded = Union[bytes, tuple[Union[bytes, Join], ...]]


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
        for _, records in self.blocks_after(after_id):
            for record in records:
                if record.id > after_id:
                    yield record

    def blocks_after(self, after_id: int) -> Iterator[tuple[int, list[R]]]:
        """(block, its records) in block order, from the block holding ``after_id + 1`` on
        (the first may still hold ids up to ``after_id``: callers compare)."""
        first = (after_id + 1) // BLOCK
        for block, records in self.by_block.items():
            if block >= first:
                yield block, records


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

    def of(self, block: int, records: list[R]) -> T:
        """This view's value for one block (``records``: that block's records)."""
        value = self._done.get(block)
        if value is None:
            value = self._done[block] = self._render(records)
        return value

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


def json_list(items: Iterable[bytes]) -> Encoded:
    """A JSON array of encoded elements (references to them: see Join), for pages and filtered
    lists; a short one in one string."""
    parts = items if type(items) is list else list(items)
    if len(parts) > JOIN_CHUNK:
        return b"[", Join(parts), b"]"
    if not parts:
        return b"[]"
    return b"[" + b",".join(parts) + b"]"


def pieces(encoded: Iterable[bytes | Join]) -> Iterator[bytes]:
    """The byte strings of an Encoded value in pieces, in order (a Join's chunks in its place)."""
    for piece in encoded:
        if type(piece) is bytes:
            yield piece
        else:
            yield from piece.chunks()  # type: ignore[union-attr]


def joined(encoded: Encoded) -> bytes:
    """The whole text of an Encoded value (for callers that need one string: tests, the console)."""
    return encoded if type(encoded) is bytes else b"".join(pieces(encoded))
