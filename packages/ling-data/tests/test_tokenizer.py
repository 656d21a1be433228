from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ling_data import DataError, Tokenizer, cached_tokenizer
from ling_data import tokenizer as tokenizer_module

WHITESPACE_MARKER = "\u2581"  # sentencepiece's "▁": decodes as a space, so it cannot round-trip
quick = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_special_ids_and_vocab_size(small_tokenizer: Tokenizer) -> None:
    assert small_tokenizer.vocab_size == 400
    assert (small_tokenizer.pad_id, small_tokenizer.bos_id, small_tokenizer.eos_id) == (0, 2, 3)


@quick
@given(text=st.text().filter(lambda text: WHITESPACE_MARKER not in text))
@example(text="")
@example(text="  two  spaces, a tab\there and a trailing newline\n")
@example(text="\r\n\x00\x7f \ufeff")
@example(text="日本語 • ünïcödé • 🎉 • e\u0301 • ｆｕｌｌ")
def test_round_trips_text_exactly(small_tokenizer: Tokenizer, text: str) -> None:
    ids = small_tokenizer.encode(text)
    assert all(0 <= token < small_tokenizer.vocab_size for token in ids)
    assert 1 not in ids  # byte fallback: nothing becomes <unk>
    assert small_tokenizer.decode(ids) == text


@quick
@given(data=st.data())
def test_round_trips_corpus_slices(small_tokenizer: Tokenizer, corpus: list[str], data: st.DataObject) -> None:
    document = data.draw(st.sampled_from(corpus[40:]))  # text the tokenizer was not trained on
    start = data.draw(st.integers(0, len(document)))
    text = document[start : start + data.draw(st.integers(0, 500))]
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_whitespace_marker_is_the_documented_exception(small_tokenizer: Tokenizer) -> None:
    assert small_tokenizer.decode(small_tokenizer.encode(f"a{WHITESPACE_MARKER}b")) == "a b"


def test_learns_merges(small_tokenizer: Tokenizer, corpus: list[str], tmp_path: Path) -> None:
    larger = Tokenizer.train(corpus[:40], 1000, tmp_path / "larger.model")
    text = corpus[0][:2000]
    small_count, larger_count = len(small_tokenizer.encode(text)), len(larger.encode(text))
    assert larger_count < small_count < 0.8 * len(text.encode())
    assert larger_count < 0.5 * len(text.encode())


def test_encode_batch_matches_encode(small_tokenizer: Tokenizer, corpus: list[str]) -> None:
    texts = [corpus[0][:300], "", "é x", corpus[5][:100]]
    assert small_tokenizer.encode_batch(texts) == [small_tokenizer.encode(text) for text in texts]
    assert small_tokenizer.encode_batch([]) == []


def test_decode_accepts_tensors_and_rejects_bad_ids(small_tokenizer: Tokenizer) -> None:
    ids = small_tokenizer.encode("hello world")
    assert small_tokenizer.decode(torch.tensor(ids)) == "hello world"
    with pytest.raises(ValueError, match=r"expected int token ids in \[0, 400\)"):
        small_tokenizer.decode([400])
    with pytest.raises(ValueError, match="expected int token ids"):
        small_tokenizer.decode([-1])


def test_encode_rejects_non_strings_and_lone_surrogates(small_tokenizer: Tokenizer) -> None:
    with pytest.raises(TypeError):
        small_tokenizer.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError):
        small_tokenizer.encode("a\ud800b")


def test_training_is_deterministic_and_atomic(corpus: list[str], tmp_path: Path) -> None:
    first = Tokenizer.train(corpus[:20], 350, tmp_path / "one" / "m.model")
    second = Tokenizer.train(corpus[:20], 350, tmp_path / "two" / "m.model")
    assert (tmp_path / "one" / "m.model").read_bytes() == (tmp_path / "two" / "m.model").read_bytes()
    assert sorted(path.name for path in (tmp_path / "one").iterdir()) == ["m.model"]  # no temp files left
    assert first.model_path == tmp_path / "one" / "m.model"
    assert first.encode(corpus[30][:500]) == second.encode(corpus[30][:500])


def test_unigram_round_trips(corpus: list[str], tmp_path: Path) -> None:
    tokenizer = Tokenizer.train(corpus[:20], 400, tmp_path / "u.model", model_type="unigram")
    text = corpus[30][:1000] + " ünï 🎉"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_load_matches_trained(small_tokenizer: Tokenizer, corpus: list[str]) -> None:
    assert small_tokenizer.model_path is not None
    loaded = Tokenizer.load(small_tokenizer.model_path)
    text = corpus[50][:1000]
    assert loaded.encode(text) == small_tokenizer.encode(text)
    assert loaded.vocab_size == small_tokenizer.vocab_size


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.model: does not exist; expected a sentencepiece"):
        Tokenizer.load(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"garbage\.model: not a sentencepiece model"):
        Tokenizer.load(garbage)


def test_train_argument_errors(corpus: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model_type='word'"):
        Tokenizer.train(corpus[:2], 300, tmp_path / "m.model", model_type="word")
    with pytest.raises(ValueError, match=r"vocab_size=0"):
        Tokenizer.train(corpus[:2], 0, tmp_path / "m.model")
    with pytest.raises(ValueError, match="no non-blank lines"):
        Tokenizer.train(["", " \n "], 300, tmp_path / "m.model")
    with pytest.raises(TypeError):
        Tokenizer.train("a single string", 300, tmp_path / "m.model")
    with pytest.raises(ValueError, match=r"vocab_size=100000 on \d+ lines"):
        Tokenizer.train(corpus[:2], 100_000, tmp_path / "m.model")
    assert not (tmp_path / "m.model").exists()


def test_cached_tokenizer_trains_once(corpus: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    documents = corpus[:10]
    first = cached_tokenizer(documents, 400, tmp_path)
    [model] = (tmp_path / "tokenizers").iterdir()
    assert model.name.startswith("bpe-400-")

    def no_training(*args: object, **kwargs: object) -> Tokenizer:
        raise AssertionError("trained again despite a cached model")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    again = cached_tokenizer(documents, 400, tmp_path)
    assert again.model_path == model
    assert again.encode(corpus[20][:300]) == first.encode(corpus[20][:300])


def test_cache_key_covers_documents_and_options() -> None:
    key = tokenizer_module._cache_key
    base = key(["ab", "c"], 400, "bpe", 0)
    assert base == key(["ab", "c"], 400, "bpe", 0)
    others = [
        key(["a", "bc"], 400, "bpe", 0),
        key(["ab", "c", ""], 400, "bpe", 0),
        key(["ab", "c"], 321, "bpe", 0),
        key(["ab", "c"], 400, "unigram", 0),
        key(["ab", "c"], 400, "bpe", 1),
    ]
    assert base not in others and len(set(others)) == len(others)


def test_cached_tokenizer_uses_env_cache_dir_and_recovers_from_corruption(
    corpus: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LING_CACHE_DIR", str(tmp_path / "env-cache"))
    first = cached_tokenizer(corpus[:10], 400)
    assert first.model_path is not None and first.model_path.parent == tmp_path / "env-cache" / "tokenizers"
    first.model_path.write_bytes(b"truncated")
    again = cached_tokenizer(corpus[:10], 400)
    assert again.encode("hello world") == first.encode("hello world")
    assert Tokenizer.load(first.model_path).vocab_size == 400
