from __future__ import annotations

import pytest

from ling_data import Tokenizer, embedded_corpus


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return embedded_corpus()


@pytest.fixture(scope="session")
def small_tokenizer(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A 400-piece BPE model trained on a slice of the corpus (well under a second)."""
    return Tokenizer.train(corpus[:40], 400, tmp_path_factory.mktemp("tok") / "small.model")
