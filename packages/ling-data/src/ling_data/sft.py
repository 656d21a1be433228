"""Supervised fine-tuning data: a rendered chat -> token ids with a loss mask -> packed rows.

The loss covers what the assistant writes and nothing else. A turn's target runs from the end
of its prompt (`prompt_chars`, as `ling_data.kg` writes it) through the first stop sequence
that ling-eval's generation stops at (`<|im_end|>`; in the react format also
`\\nObservation:`), the stop included: training teaches exactly what generation is later asked
to produce, and where to stop. The system prompt with its tool list, the user's question and
the tool results are context only.

The text is encoded piece by piece (context, target, context, ...), so no token straddles a
boundary and a prompt encodes as it does alone at evaluation time.

Packing puts whole samples into rows of `seq_len` tokens and records, per token, which sample
it belongs to (`segment_ids`, 0 for padding) and its position within that sample
(`position_ids`), so that attention and RoPE can treat each sample as if it were alone.
Labels are aligned with the inputs (`labels[t]` is the target of position `t`); a label is
-100 wherever the next token is context, belongs to another sample, or is padding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ling_data.errors import DataError

IGNORE_INDEX = -100
STOP_SEQUENCES = {"json": ("<|im_end|>",), "react": ("\nObservation:", "<|im_end|>")}


@dataclass(frozen=True)
class ChatSample:
    """One rendered chat: `text` and, per assistant turn, where its prompt ends (code points)."""

    text: str
    prompt_chars: tuple[int, ...]
    format: str
    source: str = "<memory>"  # file:line, for error messages


@dataclass(frozen=True)
class EncodedSample:
    ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]  # True where the token is something the assistant writes
    source: str = "<memory>"


def loss_spans(sample: ChatSample) -> list[tuple[int, int]]:
    """[start, end) character spans the loss covers, one per turn, in order."""
    if sample.format not in STOP_SEQUENCES:
        raise DataError(f"{sample.source}: unknown format {sample.format!r}; expected one of "
                        f"{', '.join(STOP_SEQUENCES)}")
    if not sample.prompt_chars:
        raise DataError(f"{sample.source}: no turns (expected at least one assistant turn)")
    spans: list[tuple[int, int]] = []
    for index, start in enumerate(sample.prompt_chars):
        if not 0 < start <= len(sample.text):
            raise DataError(f"{sample.source}: turns[{index}].prompt_chars is {start}; expected 1 to the text's "
                            f"length {len(sample.text)}")
        if spans and start < spans[-1][1]:
            raise DataError(f"{sample.source}: turns[{index}] starts at char {start}, inside the previous turn's "
                            f"answer (which ends at {spans[-1][1]}); expected turns in order")
        ends = [found + len(stop) for stop in STOP_SEQUENCES[sample.format]
                if (found := sample.text.find(stop, start)) >= 0]
        if not ends:
            raise DataError(f"{sample.source}: turns[{index}] has no stop sequence after char {start} (expected "
                            f"one of {', '.join(map(repr, STOP_SEQUENCES[sample.format]))})")
        spans.append((start, min(ends)))
    return spans


def pieces(sample: ChatSample) -> list[tuple[str, bool]]:
    """The text cut at the loss spans' edges: (piece, is_target), empty pieces dropped."""
    out, cursor = [], 0
    for start, end in loss_spans(sample):
        out += [(sample.text[cursor:start], False), (sample.text[start:end], True)]
        cursor = end
    out.append((sample.text[cursor:], False))
    return [(text, target) for text, target in out if text]


def encode_samples(tokenizer, samples: Sequence[ChatSample], start_ids: Sequence[int] = ()) -> list[EncodedSample]:
    """Token ids and loss masks; every piece of every sample goes through one `encode_batch`.
    `start_ids` open every sample, as context (ling-train passes EOS: pretraining documents and
    ling-eval's prompts both follow an EOS)."""
    cut = [pieces(sample) for sample in samples]
    flat = [text for sample_pieces in cut for text, _ in sample_pieces]
    encoded = iter(tokenizer.encode_batch(flat))
    out = []
    for sample, sample_pieces in zip(samples, cut):
        ids: list[int] = list(start_ids)
        mask: list[bool] = [False] * len(ids)
        for _, target in sample_pieces:
            piece_ids = next(encoded)
            ids += piece_ids
            mask += [target] * len(piece_ids)
        out.append(EncodedSample(tuple(ids), tuple(mask), sample.source))
    return out


def read_chat_samples(path: str | Path) -> Iterator[ChatSample]:
    """Samples from a `ling-data kg` JSONL file (`text`, `format`, `turns[].prompt_chars`)."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: not found (expected a JSONL file of chat samples, e.g. ling-data kg's "
                        f"train.jsonl)") from None
    with handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            source = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: invalid JSON ({e.msg})") from None
            yield _chat_sample(row, source)


def _chat_sample(row, source: str) -> ChatSample:
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object")
    text, fmt, turns = row.get("text"), row.get("format"), row.get("turns")
    if not isinstance(text, str) or not text:
        raise DataError(f"{source}: 'text' must be a non-empty string")
    if not isinstance(fmt, str):
        raise DataError(f"{source}: 'format' must be a string ({' or '.join(STOP_SEQUENCES)})")
    if not isinstance(turns, list):
        raise DataError(f"{source}: 'turns' must be a list of {{\"prompt_chars\": N, ...}}")
    prompt_chars = []
    for index, turn in enumerate(turns):
        value = turn.get("prompt_chars") if isinstance(turn, dict) else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{source}: turns[{index}].prompt_chars must be an integer")
        prompt_chars.append(value)
    sample = ChatSample(text, tuple(prompt_chars), fmt, source)
    loss_spans(sample)  # every check now, with the line number, not at encoding time
    return sample


@dataclass
class PackedRows:
    """`[rows, seq_len]` int64 tensors; `segment_ids` numbers the samples of a row from 1."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    target_tokens: int  # tokens that carry loss
    context_tokens: int  # tokens packed but masked (prompts, tool results)
    padding_tokens: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack_samples(samples: Iterable[EncodedSample], seq_len: int, pad_id: int) -> PackedRows:
    """First-fit packing in the given order into rows of `seq_len` (the caller shuffles).

    A sample longer than `seq_len` is bad input: DataError naming its source, since cutting it
    would train the model on an answer whose question was cut away."""
    rows: list[list[EncodedSample]] = []
    room: list[int] = []
    for sample in samples:
        _check_fits([sample], seq_len, "sample")
        for index, free in enumerate(room):
            if free >= len(sample.ids):
                rows[index].append(sample)
                room[index] -= len(sample.ids)
                break
        else:
            rows.append([sample])
            room.append(seq_len - len(sample.ids))
    return _fill_rows(rows, seq_len, pad_id)


def pack_pairs(pairs: Iterable[tuple[EncodedSample, EncodedSample]], seq_len: int, pad_id: int) -> PackedRows:
    """One row per preference pair: the chosen sample as segment 1, the rejected as segment 2
    (attention stays inside each), so a batch of rows is a batch of pairs whatever the loader's
    order. A pair longer than `seq_len` is bad input, as a sample is in `pack_samples`."""
    rows = [list(pair) for pair in pairs]
    for row in rows:
        _check_fits(row, seq_len, "pair (chosen + rejected)")
    return _fill_rows(rows, seq_len, pad_id)


def _check_fits(row: list[EncodedSample], seq_len: int, what: str) -> None:
    length = sum(len(sample.ids) for sample in row)
    if length > seq_len:
        raise DataError(f"{row[0].source}: the {what} is {length} tokens, longer than seq_len {seq_len}; raise "
                        f"seq_len or shorten the sample")
    for sample in row:
        if not any(sample.loss_mask[1:]):
            raise DataError(f"{sample.source}: no token to train on (the answer must follow some context)")


def _fill_rows(rows: list[list[EncodedSample]], seq_len: int, pad_id: int) -> PackedRows:
    """The tensors of rows of whole samples, each sample its own segment from 1."""
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    target = context = 0
    for row, row_samples in enumerate(rows):
        cursor = 0
        for segment, sample in enumerate(row_samples, 1):
            n = len(sample.ids)
            ids = torch.tensor(sample.ids, dtype=torch.long)
            mask = torch.tensor(sample.loss_mask, dtype=torch.bool)
            span = slice(cursor, cursor + n)
            input_ids[row, span] = ids
            position_ids[row, span] = torch.arange(n)
            segment_ids[row, span] = segment
            # position t predicts token t + 1 of the same sample, when that token is a target
            labels[row, cursor:cursor + n - 1] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
            cursor += n
            trained = int(mask[1:].sum())
            target += trained
            context += n - trained
    padding = len(rows) * seq_len - target - context
    return PackedRows(input_ids, labels, position_ids, segment_ids, target, context, padding)


class SFTLoader:
    """Serve ``(input_ids, labels, segment_ids)`` batches of packed SFT rows, forever.

    The rows are fixed once packed; what changes per epoch is their order. That is exactly what
    :class:`~ling_data.packing.PackedLoader` does for windows of a token stream, so the row
    order comes from one over the stream ``0, 1, ..., len(rows)`` with ``seq_len=1`` (window
    ``i`` is row ``i``): the seeded per-epoch permutation, the per-rank slices of a global batch
    (``batch_sizes`` included), ``state_dict`` and its checks, and ling-train's remapping of a
    position saved at another world size all carry over unchanged.
    """

    def __init__(self, rows: PackedRows, batch_size: int | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, batch_sizes: Sequence[int] | None = None) -> None:
        from ling_data.packing import PackedLoader
        self.rows = rows
        self.seq_len = rows.input_ids.shape[1]
        try:
            self.order = PackedLoader(torch.arange(len(rows) + 1), seq_len=1, batch_size=batch_size, seed=seed,
                                      rank=rank, world_size=world_size, batch_sizes=batch_sizes)
        except DataError:
            raise DataError(f"{len(rows)} packed rows of {self.seq_len} tokens are too few for a global batch of "
                            f"{sum(batch_sizes) if batch_sizes else batch_size * world_size} rows; use more "
                            f"samples or a smaller batch_size") from None

    def __getattr__(self, name: str):  # epoch, position, batch_sizes, batches_per_epoch, world_size, ...
        if name in ("rows", "seq_len", "order"):
            raise AttributeError(name)
        return getattr(self.order, name)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, _ = self.order.next_batch()
        index = index[:, 0]
        return self.rows.input_ids[index], self.rows.labels[index], self.rows.segment_ids[index]

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "sft_rows": len(self.rows), "sft_seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key, value in (("sft_seq_len", self.seq_len), ("sft_rows", len(self.rows))):
            if key in state and state[key] != value:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {key}={value!r}; "
                                 "resuming would serve different batches")
        self.order.load_state_dict({k: v for k, v in state.items() if not k.startswith("sft_")})
