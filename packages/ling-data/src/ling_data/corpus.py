"""Documents: the embedded offline corpus and plain-text/JSONL readers."""

from __future__ import annotations

import ast
import contextlib
import gc
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ling_data.errors import DataError

logger = logging.getLogger(__name__)

# Directories of the standard library whose docstrings are not prose worth learning from
# (test suites, the IDLE GUI, demos, the deprecated 2to3 machinery) or not the stdlib at all.
_SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"})
_MIN_DOCUMENT_CHARS = 200
_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Statement lists are the only places a def/class can appear, so walking just these finds
# every docstring without visiting the (much larger) expression trees.
_STATEMENT_FIELDS = ("body", "orelse", "handlers", "finalbody", "cases")
_DOCUMENT_SUFFIXES = (".txt", ".jsonl")


def embedded_corpus() -> list[str]:
    """Return the offline corpus: docstrings of the Python standard library.

    Every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` is parsed with :mod:`ast`
    (never imported); each module gives one document, its module, class and function
    docstrings in source order joined by blank lines. Test suites, ``idlelib``,
    ``turtledemo``, ``lib2to3`` and ``site-packages`` are skipped, as are files that fail to
    parse and documents shorter than 200 characters. Files are visited sorted by relative
    path, so the result depends only on the Python installation (about 1.6 MB of text in
    about 360 documents on CPython 3.11).
    """
    return _docstring_documents(Path(sysconfig.get_paths()["stdlib"]))


def _docstring_documents(root: Path, min_chars: int = _MIN_DOCUMENT_CHARS) -> list[str]:
    paths = sorted(
        (path.relative_to(root).as_posix(), path)
        for path in root.rglob("*.py")
        if path.is_file() and not _SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
    )
    documents = []
    with _gc_paused():
        for relative, path in paths:
            try:
                tree = ast.parse(path.read_bytes(), filename=relative)
            except (SyntaxError, ValueError, OSError) as error:
                # Some stdlib files are deliberately invalid or target another Python.
                logger.debug("skipping %s: %s", relative, error)
                continue
            docstrings: list[str] = []
            _collect_docstrings(tree, docstrings)
            document = "\n\n".join(docstrings)
            if len(document) >= min_chars:
                documents.append(document)
    return documents


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # ast.parse allocates millions of objects; with torch loaded, the collections they
    # trigger walk a large heap and double the build time (3.6 s -> 1.8 s on 2 cores).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _collect_docstrings(node: ast.AST, out: list[str]) -> None:
    if isinstance(node, _DOCSTRING_OWNERS):
        docstring = ast.get_docstring(node)
        if docstring:
            out.append(docstring)
    for field in _STATEMENT_FIELDS:
        for child in getattr(node, field, None) or ():
            if isinstance(child, ast.AST):
                _collect_docstrings(child, out)


def read_text_documents(path: str | os.PathLike[str]) -> list[str]:
    """Read documents from a ``.txt``/``.jsonl`` file or a directory of them.

    A ``.txt`` file is one document; a ``.jsonl`` file holds one JSON object per line whose
    string field ``"text"`` is a document (blank lines are skipped). A directory is searched
    recursively and its files are read in sorted relative-path order; files with other
    suffixes are ignored. Empty and whitespace-only documents are dropped.

    Raises:
        DataError: ``path`` does not exist; no ``.txt``/``.jsonl`` file or no non-empty
            document was found; a file is not valid UTF-8, or a JSONL line is not a JSON
            object with a string ``"text"`` field (the message names ``file:line``).
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: does not exist; expected a .txt or .jsonl file or a directory of them")
    if root.is_dir():
        files = sorted(
            (file for file in root.rglob("*") if file.is_file() and file.suffix in _DOCUMENT_SUFFIXES),
            key=lambda file: file.relative_to(root).as_posix(),
        )
        if not files:
            raise DataError(f"{root}: no .txt or .jsonl files found in this directory (searched recursively)")
    elif root.suffix in _DOCUMENT_SUFFIXES:
        files = [root]
    else:
        raise DataError(f"{root}: unsupported file type {root.suffix!r}; expected .txt or .jsonl")

    documents: list[str] = []
    for file in files:
        text = _read_utf8(file)
        if file.suffix == ".txt":
            documents.append(text)
        else:
            documents.extend(_jsonl_documents(file, text))
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise DataError(
            f"{root}: no non-empty documents found; "
            'expected text in .txt files or non-empty "text" fields in .jsonl files'
        )
    return documents


def _read_utf8(file: Path) -> str:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{file}:{line}: invalid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "expected UTF-8 text"
        ) from None
    return text.removeprefix("\ufeff")


def _jsonl_documents(file: Path, text: str) -> list[str]:
    documents = []
    # Split on "\n" only: str.splitlines() would also split inside JSON strings that hold raw
    # U+2028, U+0085 and similar characters, which JSON allows.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{file}:{number}: malformed JSON ({error.msg} at column {error.colno}); "
                'expected one JSON object per line with a string field "text"'
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{file}:{number}: got a JSON {_json_type(record)}; "
                'expected a JSON object with a string field "text"'
            )
        if "text" not in record:
            raise DataError(
                f'{file}:{number}: missing field "text"; expected a JSON object with a string field "text"'
            )
        if not isinstance(record["text"], str):
            raise DataError(
                f'{file}:{number}: field "text" is a JSON {_json_type(record["text"])}; expected a string'
            )
        documents.append(record["text"])
    return documents


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)
