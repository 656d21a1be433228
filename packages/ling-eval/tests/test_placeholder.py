"""Until its issue lands, ling-eval is a placeholder: it must import and expose no API, so
nobody builds on a stub."""

import ling_eval


def test_placeholder_exports_nothing():
    assert [name for name in vars(ling_eval) if not name.startswith("_")] == []
