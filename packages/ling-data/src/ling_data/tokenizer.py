"""A byte-fallback sentencepiece tokenizer: train, cache, load, encode, decode."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from ling_data.errors import DataError

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The chat/tool-call template's markers (see ling_data.kg): always one token each, never split.
CHAT_TEMPLATE_SYMBOLS = ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                         "<tool_response>", "</tool_response>")
_MODEL_TYPES = ("bpe", "unigram")
# Beyond this many lines, training uses a seeded sample of lines (the whole stdlib corpus
# is ~33k lines and trains in well under a second).
_MAX_TRAINING_SENTENCES = 2_000_000
_MAX_SENTENCE_BYTES = 16_384
# Bump when the training options below change, so cached models are not reused wrongly.
_CACHE_FORMAT = "ling-tokenizer-v1"


class Tokenizer:
    """A sentencepiece model with byte fallback.

    Models trained by :meth:`train` have ``pad=0, unk=1, bos=2, eos=3`` and keep text exactly
    as written (identity normalisation, no dummy prefix, whitespace kept), so for every
    string ``s`` that does not contain U+2581 ("▁", sentencepiece's own whitespace marker,
    which decodes as a space) ``decode(encode(s)) == s``. Characters outside the vocabulary
    are encoded as their UTF-8 bytes, so nothing becomes ``<unk>``.

    :meth:`encode` adds no BOS/EOS; :func:`ling_data.pack_documents` appends EOS.
    """

    def __init__(self, model_proto: bytes, model_path: Path | None = None) -> None:
        self._processor = spm.SentencePieceProcessor()
        self._processor.LoadFromSerializedProto(model_proto)
        self._model_path = model_path

    @classmethod
    def train(
        cls,
        documents: Iterable[str],
        vocab_size: int,
        model_path: str | os.PathLike[str],
        model_type: str = "bpe",
        seed: int = 0,
        user_defined_symbols: Sequence[str] = (),
    ) -> Tokenizer:
        """Train on ``documents`` and write the model to ``model_path`` (atomically).

        ``user_defined_symbols`` (e.g. :data:`CHAT_TEMPLATE_SYMBOLS`) get ids right after the
        four special ids, in the order given, and always encode as one token.

        Each non-blank line of each document is one training sentence. The result depends
        only on the arguments: training is single-threaded (sentencepiece's multi-threaded
        BPE is not reproducible), and above two million lines a sample drawn with ``seed``
        is used.

        Raises:
            ValueError: bad ``vocab_size``/``model_type``, no text, or sentencepiece cannot
                reach ``vocab_size`` on this text (it says the largest size it can).
        """
        if isinstance(documents, str):
            raise TypeError("documents must be an iterable of strings, not a single string")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r}; expected one of {_MODEL_TYPES}")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size={vocab_size!r}; expected a positive integer")
        sentences = _training_sentences(documents, seed)
        if not sentences:
            raise ValueError("documents contain no non-blank lines to train a tokenizer on")
        buffer = io.BytesIO()
        started = time.perf_counter()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=buffer,
                model_type=model_type,
                vocab_size=vocab_size,
                byte_fallback=True,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                max_sentence_length=_MAX_SENTENCE_BYTES,
                num_threads=1,
                minloglevel=2,
                **({"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}),
            )
        except RuntimeError as error:
            raise ValueError(
                f"cannot train a {model_type} tokenizer with vocab_size={vocab_size} on "
                f"{len(sentences)} lines: {error}"
            ) from None
        model_proto = buffer.getvalue()
        path = Path(model_path)
        _write_atomic(path, model_proto)
        logger.info(
            "trained %s tokenizer (vocab %d) on %d lines in %.1f s -> %s",
            model_type, vocab_size, len(sentences), time.perf_counter() - started, path,
        )
        return cls(model_proto, path)

    @classmethod
    def load(cls, model_path: str | os.PathLike[str]) -> Tokenizer:
        """Load a sentencepiece ``.model`` file.

        Raises:
            DataError: the file does not exist or is not a sentencepiece model.
        """
        path = Path(model_path)
        try:
            model_proto = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: does not exist; expected a sentencepiece .model file") from None
        except IsADirectoryError:
            raise DataError(f"{path}: is a directory; expected a sentencepiece .model file") from None
        try:
            return cls(model_proto, path)
        except RuntimeError as error:
            raise DataError(f"{path}: not a sentencepiece model ({error}); expected a .model file") from None

    @property
    def model_path(self) -> Path | None:
        """Where the model file lives (``None`` if built from bytes)."""
        return self._model_path

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._encode(text)

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text, encoded on ``num_threads`` threads (-1: all cores)."""
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_batch expects strings, got {type(text).__name__}")
        return self._encode(texts, num_threads) if texts else []

    def piece(self, token_id: int) -> str:
        """The vocabulary piece of ``token_id`` (e.g. ``"<|im_start|>"``)."""
        return self._processor.id_to_piece(token_id)

    def _encode(self, text_or_texts: str | list[str], num_threads: int = -1) -> Any:
        try:
            return self._processor.encode(text_or_texts, out_type=int, num_threads=num_threads)
        except (RuntimeError, TypeError):
            # pybind11 cannot convert strings holding lone surrogates and says so obscurely;
            # encoding to UTF-8 raises a UnicodeEncodeError naming the position instead.
            for text in [text_or_texts] if isinstance(text_or_texts, str) else text_or_texts:
                text.encode("utf-8")
            raise

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (a sequence of ints, or a 1-D tensor/array)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        vocab_size = self.vocab_size
        for token in ids:
            if not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ValueError(f"cannot decode {token!r}: expected int token ids in [0, {vocab_size})")
        return self._processor.decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, model_path={str(self._model_path)!r})"


def cached_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    model_type: str = "bpe",
    seed: int = 0,
    user_defined_symbols: Sequence[str] = (),
) -> Tokenizer:
    """Train a tokenizer once per (documents, vocab_size, model_type, seed, symbols) and reuse it.

    The model is stored as ``<cache_dir>/tokenizers/<model_type>-<vocab_size>-<key>.model``,
    where ``key`` is a sha256 of the documents and options. ``cache_dir`` defaults to
    ``$LING_CACHE_DIR`` or ``~/.cache/ling``. Safe under concurrency: the model is written to a
    temp file and renamed, so readers never see a partial file and racing writers write the
    same bytes.
    """
    documents = list(documents)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(documents, vocab_size, model_type, seed)
    if user_defined_symbols:  # only then, so that existing cache entries keep their keys
        key = hashlib.sha256((key + "\0" + "\0".join(user_defined_symbols)).encode()).hexdigest()
    path = root / "tokenizers" / f"{model_type}-{vocab_size}-{key[:16]}.model"
    if path.exists():
        try:
            tokenizer = Tokenizer.load(path)
        except DataError as error:
            logger.warning("retraining tokenizer: cached model is unreadable: %s", error)
        else:
            logger.info("loaded cached tokenizer %s", path)
            return tokenizer
    return Tokenizer.train(documents, vocab_size, path, model_type=model_type, seed=seed,
                           user_defined_symbols=user_defined_symbols)


def default_cache_dir() -> Path:
    """``$LING_CACHE_DIR`` if set, else ``~/.cache/ling``."""
    return Path(os.environ.get("LING_CACHE_DIR") or Path.home() / ".cache" / "ling")


def _cache_key(documents: list[str], vocab_size: int, model_type: str, seed: int) -> str:
    digest = hashlib.sha256()
    header = (_CACHE_FORMAT, f"sentencepiece={spm.__version__}", model_type, vocab_size, seed, len(documents))
    digest.update("\0".join(map(str, header)).encode() + b"\0")
    for document in documents:
        data = document.encode("utf-8")
        # Length-prefixed so that ["ab", "c"] and ["a", "bc"] hash differently.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _training_sentences(documents: Iterable[str], seed: int) -> list[str]:
    sentences = []
    for document in documents:
        if not isinstance(document, str):
            raise TypeError(f"documents must be strings, got {type(document).__name__}")
        sentences.extend(line for line in document.split("\n") if line.strip())
    if len(sentences) > _MAX_TRAINING_SENTENCES:
        chosen = random.Random(seed).sample(range(len(sentences)), _MAX_TRAINING_SENTENCES)
        sentences = [sentences[index] for index in sorted(chosen)]
    return sentences


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp makes it 0600; a shared cache must be readable
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
