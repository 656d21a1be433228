"""Until its issue lands, ling-dist is a placeholder: it must import and expose no API, so
nobody builds on a stub."""

import ling_dist


def test_placeholder_exports_nothing():
    assert [name for name in vars(ling_dist) if not name.startswith("_")] == []
