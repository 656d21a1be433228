"""Streaming document readers for ``.txt``, ``.jsonl`` and ``.jsonl.zst`` files.

Every reader either yields whole, valid documents or raises :class:`DataError` naming
``file:line``; with ``skip_bad=True`` a bad line (or the unreadable rest of a corrupt
``.zst`` file) is skipped and counted in :class:`ReadStats` instead. Nothing is yielded from a
line that failed, so a downstream shard never holds a silently truncated document.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from ling_data.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.zst")
_CHUNK_BYTES = 1 << 20


@dataclass
class Document:
    text: str
    source: str  # "file:line" (or "file" for a .txt document)


@dataclass
class ReadStats:
    """What the readers saw: files, documents yielded, and bad lines skipped (by reason)."""

    files: int = 0
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(message)

    def as_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents, "skipped": dict(self.skipped),
                "skipped_examples": list(self.skipped_examples)}


def suffix_of(path: Path) -> str | None:
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def find_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories (searched recursively, sorted) into readable files.

    Raises:
        DataError: a path does not exist, has an unsupported type, or a directory holds none.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: does not exist; expected a {'/'.join(SUFFIXES)} file or a directory of them")
        if path.is_dir():
            found = sorted((f for f in path.rglob("*") if f.is_file() and suffix_of(f)),
                           key=lambda f: f.relative_to(path).as_posix())
            if not found:
                raise DataError(f"{path}: no {'/'.join(SUFFIXES)} files found in this directory (searched recursively)")
            files.extend(found)
        elif suffix_of(path):
            files.append(path)
        else:
            raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    return files


def read_documents(
    paths: Iterable[str | os.PathLike[str]],
    *,
    skip_bad: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Yield the documents of ``paths`` (files or directories) in order, streaming.

    ``.txt``: the whole file is one document. ``.jsonl`` / ``.jsonl.zst``: one JSON object per
    line with a string field ``"text"``; blank lines are skipped. Empty documents are dropped.

    Raises:
        DataError: naming ``file:line`` for invalid UTF-8, malformed JSON, a missing or
            non-string ``"text"``, or a truncated/corrupt ``.zst`` stream (unless ``skip_bad``).
    """
    stats = stats if stats is not None else ReadStats()
    for file in find_files(paths):
        stats.files += 1
        reader = _read_txt if suffix_of(file) == ".txt" else _read_jsonl
        for document in reader(file, skip_bad, stats):
            if document.text.strip():
                stats.documents += 1
                yield document


def _read_txt(file: Path, skip_bad: bool, stats: ReadStats) -> Iterator[Document]:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        message = f"{file}:{line}: invalid UTF-8 (byte 0x{data[error.start]:02x}); expected UTF-8 text"
        if not skip_bad:
            raise DataError(message) from None
        stats.skip("invalid_utf8", message)
        return
    yield Document(text.removeprefix("\ufeff"), str(file))


def _read_jsonl(file: Path, skip_bad: bool, stats: ReadStats) -> Iterator[Document]:
    number = 0
    try:
        for number, raw in enumerate(_lines(file), start=1):
            try:
                text = _parse_jsonl_line(raw, number == 1)
            except _BadLine as error:
                message = f"{file}:{number}: {error.message}"
                if not skip_bad:
                    raise DataError(message) from None
                stats.skip(error.reason, message)
                continue
            if text is not None:
                yield Document(text, f"{file}:{number}")
    except _CorruptStream as error:
        message = f"{file}:{number + 1}: {error}"
        if not skip_bad:
            raise DataError(message) from None
        stats.skip("corrupt_zst", message)


def _parse_jsonl_line(raw: bytes, first: bool) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _BadLine(f"invalid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                        "expected UTF-8 text", "invalid_utf8") from None
    if first:
        line = line.removeprefix("\ufeff")
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        where = f" ({error.msg} at column {error.colno})" if isinstance(error, json.JSONDecodeError) else ""
        raise _BadLine(f'malformed JSON{where}; expected one JSON object per line with a string field "text"',
                        "malformed_json") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise _BadLine('expected a JSON object with a string field "text"', "missing_text")
    text = record["text"]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800" escapes decode to lone surrogates
        raise _BadLine('field "text" holds a lone surrogate escape; expected valid Unicode', "invalid_utf8") from None
    return text


class _BadLine(Exception):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message, self.reason = message, reason


class _CorruptStream(Exception):
    pass


def _lines(file: Path) -> Iterator[bytes]:
    """Lines of a file (``.zst`` decompressed), split on ``\\n`` only, without the newline."""
    chunks = _zstd_chunks(file) if file.name.endswith(".zst") else _raw_chunks(file)
    pending: list[bytes] = []  # pieces of the line not yet ended (a list: no quadratic +=)
    for chunk in chunks:
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            pending.append(chunk)
            continue
        pending.append(pieces[0])
        yield b"".join(pending)
        yield from pieces[1:-1]
        pending = [pieces[-1]]
    if rest := b"".join(pending):
        yield rest


def _raw_chunks(file: Path) -> Iterator[bytes]:
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            yield chunk


def _zstd_chunks(file: Path) -> Iterator[bytes]:
    # zstandard's stream_reader returns a truncated frame's prefix without complaint, so frames
    # are decoded with decompressobj and the end of input is checked to close a frame.
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    in_frame = False
    with open(file, "rb") as handle:
        while data := handle.read(_CHUNK_BYTES):
            while data:
                in_frame = True
                try:
                    out = frame.decompress(data)
                except zstandard.ZstdError as error:
                    raise _CorruptStream(f"corrupt zstd data ({error}); expected a valid .zst file") from None
                if out:
                    yield out
                if frame.eof:  # a frame ended: the rest (if any) starts the next frame
                    data = frame.unused_data
                    frame = decompressor.decompressobj()
                    in_frame = False
                else:
                    data = b""
    if in_frame:
        raise _CorruptStream("truncated zstd stream (the last frame is incomplete); expected a complete .zst file")
