"""Token shards on disk: the format, the manifest, and a verifying reader.

A shard directory holds ``manifest.json``, ``tokenizer.model`` and ``shard-NNNNN.zst`` files.
Each shard is one zstd frame whose payload is the documents' token counts (little-endian
uint32, one per document) followed by all their tokens (``manifest["dtype"]``, little-endian),
documents in order, no separators (the loader inserts EOS). The manifest lists every shard
with its ``documents``, ``tokens``, ``bytes`` and ``sha256`` (of the compressed file), and the
totals. Readers check the checksum before decompressing and the sizes after.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from ling_data.errors import DataError

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT = "ling-token-shards/1"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_LENGTH_DTYPE = np.dtype("<u4")


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def encode_shard(lengths: np.ndarray, tokens: np.ndarray, dtype: str, level: int = 3) -> bytes:
    payload = lengths.astype(_LENGTH_DTYPE, copy=False).tobytes() + tokens.astype(_DTYPES[dtype], copy=False).tobytes()
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(payload)


@dataclass
class Shard:
    """One shard's documents: ``lengths[i]`` tokens each, concatenated in ``tokens``."""

    lengths: np.ndarray
    tokens: np.ndarray


def is_shard_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST_FILE).is_file()


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json``.

    Raises:
        DataError: the manifest is missing, not JSON, or a field is missing or has the wrong
            type (the message names the field).
    """
    path = Path(directory) / MANIFEST_FILE
    if Path(directory).exists() and not Path(directory).is_dir():
        raise DataError(f"{directory}: is a file, not a directory; expected a token shard directory "
                        "written by `ling-data tokenize`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: does not exist; expected a token shard directory written by `ling-data tokenize`") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); expected a ling-data shard manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}; "
                        f"expected {FORMAT!r}")
    for key, kind in (("dtype", str), ("vocab_size", int), ("eos_id", int), ("tokens", int),
                      ("documents", int), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            raise DataError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if manifest["dtype"] not in _DTYPES:
        raise DataError(f"{path}: dtype {manifest['dtype']!r}; expected one of {sorted(_DTYPES)}")
    for index, entry in enumerate(manifest["shards"]):
        for key, kind in (("file", str), ("documents", int), ("tokens", int), ("sha256", str)):
            if not isinstance(entry, dict) or not isinstance(entry.get(key), kind):
                raise DataError(f"{path}: shards[{index}].{key} is missing or not a {kind.__name__}")
        if "/" in entry["file"] or entry["file"].startswith("."):
            raise DataError(f"{path}: shards[{index}].file {entry['file']!r}; expected a file name in the directory")
    if sum(e["tokens"] for e in manifest["shards"]) != manifest["tokens"]:
        raise DataError(f"{path}: field 'tokens' does not equal the sum of the shards' tokens")
    return manifest


def read_shard(directory: str | Path, entry: dict[str, Any], dtype: str) -> Shard:
    """Read one shard, verifying its sha256, size and contents against ``entry``.

    Raises:
        DataError: naming the shard file, on a missing file, checksum mismatch, corrupt zstd
            data or sizes that disagree with the manifest.
    """
    path = Path(directory) / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read shard ({error.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise DataError(f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                        f"{entry['sha256'][:16]}...; the shard is corrupt or was replaced")
    return decode_shard(data, entry["documents"], entry["tokens"], dtype, str(path))


def decode_shard(data: bytes, documents: int, tokens: int, dtype: str, name: str) -> Shard:
    token_dtype = _DTYPES[dtype]
    expected = documents * _LENGTH_DTYPE.itemsize + tokens * token_dtype.itemsize
    try:
        # Check the size the frame header declares before decompressing, so a corrupt header
        # cannot ask for an arbitrarily large buffer.
        declared = zstandard.frame_content_size(data)
        if declared != expected:
            raise DataError(f"{name}: its zstd frame declares {declared} bytes; the manifest's {documents} "
                            f"documents and {tokens} {dtype} tokens need {expected}")
        payload = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as error:
        raise DataError(f"{name}: corrupt zstd data ({error}); expected a complete shard") from None
    if len(payload) != expected:
        raise DataError(f"{name}: holds {len(payload)} bytes; the manifest's {documents} documents and "
                        f"{tokens} {dtype} tokens need {expected}")
    lengths = np.frombuffer(payload, _LENGTH_DTYPE, count=documents)
    if int(lengths.sum(dtype=np.int64)) != tokens:
        raise DataError(f"{name}: document lengths add up to {int(lengths.sum())} tokens; the manifest says {tokens}")
    return Shard(lengths, np.frombuffer(payload, token_dtype, offset=documents * _LENGTH_DTYPE.itemsize))
