"""Streaming readers: .txt/.jsonl/.jsonl.zst, file:line errors, --skip-bad counting, fuzzing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ling_data import DataError
from ling_data.readers import ReadStats, read_documents

fuzz = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])


def texts(paths, **kwargs):
    return [document.text for document in read_documents(paths, **kwargs)]


def write_zst(path: Path, data: bytes, frames: int = 1) -> Path:
    compressor = zstandard.ZstdCompressor()
    step = max(len(data) // frames, 1)
    path.write_bytes(b"".join(compressor.compress(data[i:i + step]) for i in range(0, len(data), step)))
    return path


def jsonl(records) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()


def test_reads_all_three_formats_in_sorted_order_with_sources(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("a text file\n")
    (tmp_path / "a.jsonl").write_bytes(jsonl([{"text": "one"}, {"text": "   "}, {"text": "two"}]))
    write_zst(tmp_path / "c.jsonl.zst", jsonl([{"text": f"doc {i} \u2028"} for i in range(500)]), frames=3)
    (tmp_path / "ignored.md").write_text("not read")
    documents = list(read_documents([tmp_path]))
    assert [d.text for d in documents[:3]] == ["one", "two", "a text file\n"]
    assert documents[0].source.endswith("a.jsonl:1") and documents[1].source.endswith("a.jsonl:3")
    assert [d.text for d in documents[3:]] == [f"doc {i} \u2028" for i in range(500)]
    assert documents[-1].source.endswith("c.jsonl.zst:500")


@pytest.mark.parametrize("line, reason", [
    (b'{"text": "ok"', "malformed JSON"),
    (b'["text"]', 'string field "text"'),
    (b'{"text": 3}', 'string field "text"'),
    (b'{"text": "\xff\xfe"}', "invalid UTF-8"),
    (b'{"text": "\\ud800"}', "lone surrogate"),
])
@pytest.mark.parametrize("compressed", [False, True])
def test_bad_line_names_file_and_line_or_is_skipped_and_counted(tmp_path, line, reason, compressed) -> None:
    data = b'{"text": "first"}\n\n' + line + b'\n{"text": "last"}\n'
    path = write_zst(tmp_path / "x.jsonl.zst", data) if compressed else tmp_path / "x.jsonl"
    if not compressed:
        path.write_bytes(data)
    with pytest.raises(DataError, match=rf"x\.jsonl(\.zst)?:3: .*{reason}"):
        texts([path])
    stats = ReadStats()
    assert texts([path], skip_bad=True, stats=stats) == ["first", "last"]
    assert sum(stats.skipped.values()) == 1 and stats.documents == 2
    assert ":3:" in stats.skipped_examples[0]


def test_truncated_and_corrupt_zst_name_the_file(tmp_path: Path) -> None:
    data = jsonl([{"text": f"document number {i}"} for i in range(2000)])
    whole = zstandard.ZstdCompressor().compress(data)
    truncated = tmp_path / "t.jsonl.zst"
    truncated.write_bytes(whole[: len(whole) - 7])
    with pytest.raises(DataError, match=r"t\.jsonl\.zst:\d+: truncated zstd"):
        texts([truncated])
    stats = ReadStats()
    kept = texts([truncated], skip_bad=True, stats=stats)
    assert stats.skipped == {"corrupt_zst": 1} and len(kept) < 2000
    assert kept == [f"document number {i}" for i in range(len(kept))]  # a clean prefix, no half line
    corrupt = tmp_path / "c.jsonl.zst"
    corrupt.write_bytes(whole[:20] + bytes(b ^ 0x5A for b in whole[20:60]) + whole[60:])
    with pytest.raises(DataError, match=r"c\.jsonl\.zst:\d+: "):
        texts([corrupt])


def test_invalid_utf8_txt_and_missing_paths(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nstill fine\nbad \xc3\x28 byte\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: invalid UTF-8"):
        texts([path])
    with pytest.raises(DataError, match="does not exist"):
        texts([tmp_path / "nope.jsonl"])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unsupported file type"):
        texts([tmp_path / "x.csv"])


@fuzz
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".jsonl", ".jsonl.zst"]))
def test_random_bytes_give_documents_or_data_error(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        result = texts([path])
    except DataError:
        return
    assert all(isinstance(text, str) and text.strip() for text in result)


@fuzz
@given(records=st.lists(st.text(max_size=30), min_size=1, max_size=20), cut=st.integers(0, 10_000),
       flip=st.integers(0, 10_000))
def test_truncated_or_bit_flipped_zst_never_raises_anything_else(tmp_path, records, cut, flip) -> None:
    whole = zstandard.ZstdCompressor(write_checksum=True).compress(jsonl([{"text": t} for t in records]))
    damaged = bytearray(whole[: cut % (len(whole) + 1)])
    if damaged and flip % 2:
        damaged[flip % len(damaged)] ^= 1 << (flip % 8)
    path = tmp_path / "fuzz.jsonl.zst"
    path.write_bytes(bytes(damaged))
    try:
        result = texts([path])
    except DataError:
        return
    expected = [t for t in records if t.strip()]
    if len(damaged) == len(whole) and not flip % 2:
        assert result == expected


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_tokenizer_load_fuzz_random_bytes_give_data_error(tmp_path: Path, data: bytes) -> None:
    from ling_data import Tokenizer

    path = tmp_path / "fuzz.model"
    path.write_bytes(data)
    try:
        tokenizer = Tokenizer.load(path)
    except DataError:
        return
    assert tokenizer.vocab_size >= 0
