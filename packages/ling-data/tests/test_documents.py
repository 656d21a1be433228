from __future__ import annotations

import json
from pathlib import Path

import pytest

from ling_data import DataError, read_text_documents


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_reads_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    assert read_text_documents(path) == ["line one\nline two\n"]


def test_reads_jsonl_file_skipping_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    # Raw U+2028/U+0085 are legal inside JSON strings; they must not split the line.
    lines = [{"text": "first", "id": 1}, {"text": "raw\u2028sep\u0085 \u00e9"}]
    path.write_text("\n   \n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n", encoding="utf-8")
    assert read_text_documents(path) == ["first", "raw\u2028sep\u0085 \u00e9"]


def test_reads_directory_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c.txt").write_text("bc")
    (tmp_path / "a.txt").write_text("a")
    _jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bom.txt").write_bytes("\ufeffbom".encode())
    assert read_text_documents(tmp_path) == ["a", "b1", "b2", "bc", "bom"]
    assert read_text_documents(str(tmp_path)) == read_text_documents(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt: does not exist"):
        read_text_documents(tmp_path / "nope.txt")


def test_directory_without_documents(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("ignored")
    with pytest.raises(DataError, match=r"no \.txt or \.jsonl files"):
        read_text_documents(tmp_path)


def test_only_empty_documents(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": " \n"}])
    with pytest.raises(DataError, match="no non-empty documents"):
        read_text_documents(tmp_path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("x")
    with pytest.raises(DataError, match=r"a\.csv: unsupported file type '\.csv'; expected \.txt or \.jsonl"):
        read_text_documents(path)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text": "unterminated', r"bad\.jsonl:3: malformed JSON \(.* at column \d+\); expected one JSON object"),
        ('["text"]', r'bad\.jsonl:3: got a JSON array; expected a JSON object with a string field "text"'),
        ('{"body": "x"}', r'bad\.jsonl:3: missing field "text"'),
        ('{"text": 5}', r'bad\.jsonl:3: field "text" is a JSON number; expected a string'),
        ('{"text": null}', r'bad\.jsonl:3: field "text" is a JSON null; expected a string'),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n' + line + '\n{"text": "after"}\n')
    with pytest.raises(DataError, match=expected):
        read_text_documents(path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_names_file_and_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "caf\xe9"}\n')
    expected = rf"bad{suffix}:3: invalid UTF-8 \(byte 0xe9 at offset \d+\); expected UTF-8 text"
    with pytest.raises(DataError, match=expected):
        read_text_documents(tmp_path)


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)
