from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from ling_data.corpus import _docstring_documents, embedded_corpus

LONG = "x" * 250


def _write_module(path: Path, docstring: str, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{json.dumps(docstring)}\n{extra}")


def test_embedded_corpus_is_deterministic_and_imports_nothing(corpus: list[str]) -> None:
    modules_before = set(sys.modules)
    assert embedded_corpus() == corpus
    assert set(sys.modules) == modules_before
    assert gc.isenabled()  # the collector is paused while parsing, then restored


def test_embedded_corpus_size(corpus: list[str]) -> None:
    size = sum(len(document.encode()) for document in corpus)
    assert 500_000 < size < 20_000_000
    assert len(corpus) > 100
    assert all(len(document) >= 200 for document in corpus)


def test_embedded_corpus_holds_stdlib_docstrings(corpus: list[str]) -> None:
    import json as json_module
    import textwrap as textwrap_module

    for module in (json_module, textwrap_module):
        assert any(document.startswith(module.__doc__.strip()[:60]) for document in corpus), module


def test_collects_module_class_and_nested_function_docstrings_in_source_order(tmp_path: Path) -> None:
    source = '''"""Module doc that is long enough. ''' + LONG + '''"""
class A:
    """Class doc."""
    if True:
        def f(self):
            """Nested doc."""
            x = "not a docstring"
    try:
        pass
    finally:
        async def g():
            """Async doc."""
'''
    (tmp_path / "m.py").write_text(source)
    [document] = _docstring_documents(tmp_path)
    assert document == f"Module doc that is long enough. {LONG}\n\nClass doc.\n\nNested doc.\n\nAsync doc."


def test_skips_test_dirs_unparsable_files_and_short_documents(tmp_path: Path) -> None:
    _write_module(tmp_path / "b.py", "B " + LONG)
    _write_module(tmp_path / "a" / "z.py", "AZ " + LONG)
    _write_module(tmp_path / "short.py", "too short")
    for skipped in ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"):
        _write_module(tmp_path / skipped / "mod.py", "skipped " + LONG)
        _write_module(tmp_path / "pkg" / skipped / "deep" / "mod.py", "skipped " + LONG)
    _write_module(tmp_path / "broken.py", "broken " + LONG, extra="def (:\n")
    (tmp_path / "latin1.py").write_bytes(b'"""caf\xe9 ' + LONG.encode() + b'"""\n')  # not UTF-8
    _write_module(tmp_path / "test_like_name.py", "kept " + LONG)  # only directories are skipped
    assert _docstring_documents(tmp_path) == ["AZ " + LONG, "B " + LONG, "kept " + LONG]
