"""Streams: a source file's bytes as collect reads them, bounded and checked as they arrive: gzip
with a bound on its expansion (``BoundedGzip``), UTF-8 and JSONL lines checked a read at a time
(``CheckedStream``), the ``Limits`` they enforce, the ``Chunk`` of records a reader yields, and
``read_ahead``, which parses the next chunks on a thread of its own while the caller writes.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import DataError

GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)  # truncated, corrupt, not gzip at all
RATIO_FROM_BYTES = 8 << 20  # a compression ratio is judged from this much output on: a small file's says little


@dataclass(frozen=True)
class Limits:
    """What one source may cost (``collect.max_record_bytes``, ``max_decompressed_bytes``,
    ``max_compression_ratio``): past any of them it is refused by name, never read on."""

    record_bytes: int = 16 << 20
    decompressed_bytes: int = 10 << 30
    compression_ratio: float = 200.0


@dataclass
class Chunk:
    """A batch of records of one file, as one list of values (or one Arrow array) per field."""

    values: dict[str, Any]
    first_row: int  # data rows of the file before this chunk
    lines: list[int] | None = None  # JSONL: each record's line number, which blank lines shift

    def __len__(self) -> int:
        return len(next(iter(self.values.values()), []))

    def where(self, index: int) -> str:
        """How an error names a row: 'row 7', or 'row 7 (line 9)' where the two differ."""
        row = self.first_row + index + 1
        line = self.lines[index] if self.lines else row
        return f"row {row}" if line == row else f"row {row} (line {line})"


class BoundedGzip:
    """gzip decompression that refuses a bomb: more than ``limits.decompressed_bytes`` out, or more
    than ``limits.compression_ratio`` times the compressed bytes read so far. Each read is checked
    before its bytes are handed on, so no caller ever holds or writes more than the limit."""

    def __init__(self, file: BinaryIO, uri: str, limits: Limits) -> None:
        self._file = file
        self._gzip = gzip.GzipFile(fileobj=file)
        self._uri = uri
        self._limits = limits
        self._out = 0

    def read(self, size: int) -> bytes:
        try:
            data = self._gzip.read(size)
        except GZIP_ERRORS as exc:
            raise DataError(f"{self._uri}: cannot decompress gzip data ({exc})") from exc
        self._out += len(data)
        read_in = self._file.tell()
        limit, ratio = self._limits.decompressed_bytes, self._limits.compression_ratio
        if self._out > limit:
            raise DataError(
                f"{self._uri}: decompresses to more than {limit} bytes (collect.max_decompressed_bytes); "
                f"refused after reading {read_in} compressed bytes"
            )
        if self._out >= RATIO_FROM_BYTES and self._out > ratio * read_in:
            raise DataError(
                f"{self._uri}: decompresses to more than {ratio:g} times its size (collect.max_compression_ratio): "
                f"{self._out} bytes from the first {read_in} compressed bytes"
            )
        return data

    def close(self) -> None:
        self._gzip.close()


class CheckedStream(io.RawIOBase):
    """Decompresses (gzip, within ``limits``) and checks UTF-8 and line lengths as bytes pass
    through, unchanged, to a parser.

    Errors name the file and say where: a truncated gzip, the byte offset and line of the first
    byte that is not UTF-8 (offsets count decompressed bytes), or the first line longer than
    ``limits.record_bytes``, refused as soon as that many bytes of it are read. A line ends at
    ``breaks``: a newline, or for CSV a carriage return too (pandas ends a record at either).
    """

    def __init__(
        self, path: Path, uri: str, compressed: bool, limits: Limits, breaks: bytes = b"\n", count: bool = False
    ) -> None:
        self._file = path.open("rb")
        self._raw: BinaryIO | BoundedGzip = BoundedGzip(self._file, uri, limits) if compressed else self._file
        self._uri = uri
        self._pending = b""  # the start of a character split across reads
        self._offset = 0
        self._newlines = 0
        self._record_bytes = limits.record_bytes
        self._carriage = b"\r" in breaks
        self._line = 0  # bytes of the line being read so far
        self._count = count
        self.records = 0  # with ``count``: lines holding more than whitespace, once the stream has ended
        self._content = False  # whether the line being read holds more than whitespace so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        self._check_utf8(data)
        self._check_lines(data)
        if self._count:
            self._count_records(data)
        self._offset += len(data)
        self._newlines += data.count(b"\n")
        buffer[: len(data)] = data
        return len(data)

    def _check_utf8(self, data: bytes) -> None:
        """Arrow's UTF-8 check of the whole characters read so far (a character split across reads
        waits for its end); where it fails, Python's decoder finds the byte and the line."""
        import pyarrow as pa

        pending = self._pending
        whole = pending + data if pending else data
        cut = _complete(whole) if data else len(whole)
        try:
            if cut:
                chars = memoryview(whole)[:cut]
                pa.Array.from_buffers(pa.binary(), 1, [None, _offsets(cut), pa.py_buffer(chars)]).cast(pa.string())
        except pa.ArrowInvalid:
            pass
        else:
            if data or not whole:
                self._pending = whole[cut:]
                return
        try:
            codecs.getincrementaldecoder("utf-8")().decode(whole, final=not data)
        except UnicodeDecodeError as exc:
            line = self._newlines + whole[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{self._uri}: not valid UTF-8 at byte {self._offset - len(pending) + exc.start} (line {line})"
            ) from exc
        self._pending = whole[cut:]

    def _count_records(self, data: bytes) -> None:
        """Count the lines that hold more than whitespace (``bytes.strip``'s): the records the
        row-by-row JSONL reader would parse, which pyarrow's reader must match (it also reads two
        objects on one line, or one across two). A line's first byte decides, but for the rare
        line that starts with whitespace. A record that does not start with ``{`` stops pyarrow's
        reader before it parses it (NotAnObject): pyarrow reads a ``null`` line as a row of nulls,
        and a file of ``null`` alone crashes it."""
        import numpy as np

        if not data:
            self.records += self._content
            self._content = False
            return
        if self._offset == 0 and data.startswith(codecs.BOM_UTF8):
            data = b" " * len(codecs.BOM_UTF8) + data[len(codecs.BOM_UTF8) :]  # the reader drops a BOM
        breaks = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
        head = data[: breaks[0]] if len(breaks) else data
        if not self._content:
            self._content = _opens(head)
        if not len(breaks):
            return
        self.records += self._content
        starts, ends = breaks[:-1] + 1, breaks[1:]
        filled = starts < ends
        starts, ends = starts[filled], ends[filled]
        firsts = np.frombuffer(data, np.uint8)[starts]
        plain = ~np.isin(firsts, WHITESPACE_BYTES)
        if (firsts[plain] != ord("{")).any():
            raise NotAnObject()
        self.records += int(plain.sum())
        for start, end in zip(starts[~plain].tolist(), ends[~plain].tolist()):
            self.records += _opens(data[start:end])
        self._content = _opens(data[int(breaks[-1]) + 1 :])

    def _check_lines(self, data: bytes) -> None:
        """Refuse a line longer than the limit, counting across reads; a parser never gathers it."""
        limit = self._record_bytes
        text = data.replace(b"\r", b"\n") if self._carriage else data  # same length, same offsets
        first, last = text.find(b"\n"), text.rfind(b"\n")
        if first < 0:
            self._line += len(text)
            if self._line > limit:
                self._too_long(0)
            return
        if self._line + first > limit:
            self._too_long(0)
        if last - first - 1 > limit:  # a whole line between two breaks in this read may be too long
            lengths = list(map(len, text[first + 1 : last].split(b"\n")))
            longest = max(lengths)
            if longest > limit:
                index = lengths.index(longest)
                self._too_long(data.count(b"\n", 0, first + 1 + sum(lengths[:index]) + index))
        self._line = len(text) - last - 1
        if self._line > limit:
            self._too_long(data.count(b"\n"))

    def _too_long(self, newlines_before: int) -> None:
        line = self._newlines + newlines_before + 1
        raise DataError(
            f"{self._uri}: line {line} is longer than collect.max_record_bytes ({self._record_bytes} bytes); "
            "no record may be that long"
        )

    def close(self) -> None:
        self._raw.close()
        self._file.close()
        super().close()


WHITESPACE_BYTES = list(b" \t\r\x0b\x0c")  # bytes.strip()'s whitespace, but for the newline


class NotAnObject(Exception):
    """A JSONL line that does not start with an object: the row-by-row reader names it."""


def _opens(piece: bytes) -> bool:
    """Whether a piece of a line holds more than whitespace; NotAnObject if that is not an object's ``{``."""
    content = piece.lstrip(b" \t\r\x0b\x0c")
    if content and content[:1] != b"{":
        raise NotAnObject()
    return bool(content)


def _complete(data: bytes) -> int:
    """How many bytes of ``data`` are whole UTF-8 characters: all but a last one still missing bytes."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last character's first byte
            needs = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1
            return len(data) - back if needs > back else len(data)
    return len(data)


def _offsets(size: int) -> Any:
    """The offsets buffer of a one-value Arrow binary array of ``size`` bytes."""
    import pyarrow as pa

    return pa.py_buffer(bytes(4) + size.to_bytes(4, "little", signed=True))


@contextlib.contextmanager
def read_ahead(chunks: Iterator[Chunk], depth: int = 2) -> Iterator[Iterator[Chunk]]:
    """``chunks`` parsed by a thread of their own, up to ``depth`` ahead of the caller, so the
    parser (pyarrow's, which lets go of the GIL) works while the caller builds and writes rows.
    The chunks come in their order; a parse error is raised to the caller where that chunk would
    have come; leaving stops the thread before the file is closed."""
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def hand(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def parse() -> None:
        try:
            for chunk in chunks:
                if not hand(("chunk", chunk)):
                    return
            hand(("end", None))
        except BaseException as exc:  # handed on, raised in the caller's thread
            hand(("error", exc))

    def given() -> Iterator[Chunk]:
        while True:
            kind, item = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item

    thread = threading.Thread(target=parse, name="collect-parse", daemon=True)
    thread.start()
    try:
        yield given()
    finally:
        stop.set()
        thread.join()
