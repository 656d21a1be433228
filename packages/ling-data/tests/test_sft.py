"""SFT samples: which tokens carry loss, and what packing keeps."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_data import DataError, Tokenizer
from ling_data.sft import (IGNORE_INDEX, STOP_SEQUENCES, ChatSample, EncodedSample, encode_samples, loss_spans,
                           pack_samples, read_chat_samples)
from ling_data.tokenizer import CHAT_TEMPLATE_SYMBOLS

WORDS = st.text(alphabet="abcdefghij klmnop,.:{}\"0123é", min_size=1, max_size=30)


@pytest.fixture(scope="module")
def chat_tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    text = corpus[:40] + ["abcdefghij klmnop,.:{}\"0123é Observation: Final Answer:"] * 5
    return Tokenizer.train(text, 400, tmp_path_factory.mktemp("tok") / "chat.model",
                           user_defined_symbols=CHAT_TEMPLATE_SYMBOLS)


@st.composite
def chats(draw) -> ChatSample:
    """A chat in either format with 1-3 assistant turns, built as ling_data.kg renders them."""
    fmt = draw(st.sampled_from(sorted(STOP_SEQUENCES)))
    text = f"<|im_start|>system\n{draw(WORDS)}<|im_end|>\n<|im_start|>user\n{draw(WORDS)}<|im_end|>\n"
    prompts = []
    turns = draw(st.integers(1, 3))
    if fmt == "react":
        text += "<|im_start|>assistant\n"
    for turn in range(turns):
        last = turn == turns - 1
        if fmt == "json":
            text += "<|im_start|>assistant\n"
            prompts.append(len(text))
            text += (f"Final Answer: {draw(WORDS)}<|im_end|>\n" if last else
                     f"<tool_call>{draw(WORDS)}</tool_call><|im_end|>\n"
                     f"<|im_start|>tool\n<tool_response>{draw(WORDS)}</tool_response><|im_end|>\n")
        else:
            prompts.append(len(text))
            text += (f"Final Answer: {draw(WORDS)}<|im_end|>\n" if last else
                     f"Thought: {draw(WORDS)}\nAction: {draw(WORDS)}\nObservation: {draw(WORDS)}\n")
    return ChatSample(text, tuple(prompts), fmt)


def reference_char_mask(sample: ChatSample) -> list[bool]:
    """Character by character: from each prompt's end, loss until a stop sequence has been written."""
    mask = [False] * len(sample.text)
    for start in sample.prompt_chars:
        c = start
        while not any(sample.text[start:c].endswith(stop) for stop in STOP_SEQUENCES[sample.format]):
            mask[c] = True
            c += 1
    return mask


@settings(max_examples=60, deadline=None)
@given(sample=chats())
def test_loss_mask_matches_a_per_character_reference(chat_tokenizer, sample):
    (encoded,) = encode_samples(chat_tokenizer, [sample])
    assert chat_tokenizer.decode(list(encoded.ids)) == sample.text
    # per byte, since a character the vocabulary lacks is several byte-fallback tokens
    byte_mask = [m for ch, m in zip(sample.text, reference_char_mask(sample)) for _ in ch.encode()]
    cursor = 0
    for k, token in enumerate(encoded.ids):
        piece = chat_tokenizer.piece(token)
        width = 1 if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else len(piece.replace("\u2581", " ").encode())
        covered = byte_mask[cursor:cursor + width]
        assert covered and all(c == encoded.loss_mask[k] for c in covered), (k, piece)
        cursor += width
    assert cursor == len(byte_mask)
    # what the assistant writes is trained on, the rest never: the tool results and the question
    target_text = chat_tokenizer.decode([t for t, m in zip(encoded.ids, encoded.loss_mask) if m])
    assert "<tool_response>" not in target_text and "<|im_start|>" not in target_text
    assert target_text.endswith("<|im_end|>")
    (opened,) = encode_samples(chat_tokenizer, [sample], start_ids=(chat_tokenizer.eos_id,))
    assert opened.ids == (chat_tokenizer.eos_id, *encoded.ids) and opened.loss_mask == (False, *encoded.loss_mask)


def test_loss_spans_of_a_react_chat_stop_at_the_observation():
    text = "<|im_start|>assistant\nAction: a\nObservation: 1\nFinal Answer: 1<|im_end|>\n"
    first = text.index("Action")
    second = text.index("Final")
    assert loss_spans(ChatSample(text, (first, second), "react")) == [
        (first, text.index("\nObservation:") + len("\nObservation:")),
        (second, text.index("<|im_end|>") + len("<|im_end|>"))]


def _encoded(ids, mask, source="s"):
    return EncodedSample(tuple(ids), tuple(bool(m) for m in mask), source)


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(2, 12), min_size=1, max_size=12), seq_len=st.integers(12, 30), data=st.data())
def test_packing_keeps_every_sample_whole_and_in_its_own_segment(lengths, seq_len, data):
    samples = []
    for index, n in enumerate(lengths):
        mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda m: any(m[1:])))
        samples.append(_encoded([100 * (index + 1) + t for t in range(n)], mask, f"s{index}"))
    rows = pack_samples(samples, seq_len, pad_id=0)
    found = {}
    for row in range(len(rows)):
        for segment in rows.segment_ids[row].unique().tolist():
            if segment == 0:
                continue
            where = (rows.segment_ids[row] == segment).nonzero().flatten()
            assert torch.equal(where, torch.arange(where[0], where[-1] + 1))  # contiguous
            ids = rows.input_ids[row, where].tolist()
            found[ids[0] // 100 - 1] = (ids, rows.labels[row, where].tolist(), rows.position_ids[row, where].tolist())
    assert sorted(found) == list(range(len(samples)))
    for index, sample in enumerate(samples):
        ids, labels, positions = found[index]
        assert ids == list(sample.ids) and positions == list(range(len(ids)))
        # labels: the next token where it is a target, and never across the sample's end
        expected = [nxt if m else IGNORE_INDEX for nxt, m in zip(sample.ids[1:], sample.loss_mask[1:])]
        assert labels == expected + [IGNORE_INDEX]
    assert rows.target_tokens == sum(sum(s.loss_mask[1:]) for s in samples)
    assert rows.target_tokens + rows.context_tokens + rows.padding_tokens == len(rows) * seq_len
    assert (rows.input_ids[rows.segment_ids == 0] == 0).all()


def test_a_sample_longer_than_seq_len_names_its_source():
    with pytest.raises(DataError, match=r"train.jsonl:7: the sample is 9 tokens, longer than seq_len 8"):
        pack_samples([_encoded(range(9), [0, 1] * 4 + [1], "train.jsonl:7")], 8, pad_id=0)


def test_bad_rows_name_file_and_line(tmp_path):
    good = {"text": "<|im_start|>assistant\nFinal Answer: x<|im_end|>\n", "format": "json",
            "turns": [{"prompt_chars": 22}]}
    cases = [
        ("not json", "invalid JSON"),
        (json.dumps({**good, "turns": [{"prompt_chars": "22"}]}), r"turns\[0\].prompt_chars must be an integer"),
        (json.dumps({**good, "format": "xml"}), "unknown format 'xml'"),
        (json.dumps({**good, "text": "<|im_start|>assistant\nno stop"}), r"turns\[0\] has no stop sequence"),
        (json.dumps({**good, "turns": [{"prompt_chars": 999}]}), r"turns\[0\].prompt_chars is 999"),
    ]
    for line, message in cases:
        path = tmp_path / "train.jsonl"
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(DataError, match=f"{path}:2: {message}"):
            list(read_chat_samples(path))


def test_kg_samples_read_and_encode(tmp_path, chat_tokenizer):
    """Real `ling-data kg` rows (both formats) go through unchanged (the workspace installs the kg extra)."""
    from ling_data.kg import SynthesisConfig, build_graph, synthesize, write_outputs
    write_outputs(tmp_path, synthesize(SynthesisConfig(samples_per_pattern=2), build_graph()))
    samples = list(read_chat_samples(tmp_path / "train.jsonl"))
    assert {s.format for s in samples} == {"json", "react"}
    encoded = encode_samples(chat_tokenizer, samples[:20])
    for sample, enc in zip(samples, encoded):
        assert chat_tokenizer.decode(list(enc.ids)) == sample.text
        assert sum(enc.loss_mask) < len(enc.ids) / 2  # the tool list dominates, and is masked


def _packed(count=20, seq_len=16):
    samples = [_encoded([i + 1] * (3 + i % 5), [0, 1, 1] + [1] * (i % 5), f"s{i}") for i in range(count)]
    return pack_samples(samples, seq_len, pad_id=0)


def test_sft_loader_resumes_exactly_and_gives_ranks_disjoint_rows():
    from ling_data.sft import SFTLoader
    rows = _packed()
    loader = SFTLoader(rows, batch_size=2, seed=3)
    first = [loader.next_batch() for _ in range(3)]
    state = loader.state_dict()
    after = [loader.next_batch() for _ in range(len(rows))]  # across an epoch boundary
    resumed = SFTLoader(rows, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(after, (resumed.next_batch() for _ in after)):
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    input_ids, labels, segment_ids = first[0]
    assert input_ids.shape == labels.shape == segment_ids.shape == (2, 16)
    ranks = [SFTLoader(rows, batch_sizes=[2, 1], seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [[tuple(row.tolist()) for row in ranks[r].next_batch()[0]] for r in range(2)]
    assert len(seen[0]) == 2 and len(seen[1]) == 1 and not set(seen[0]) & set(seen[1])
    with pytest.raises(ValueError, match="sft_seq_len=16 but this loader has sft_seq_len=32"):
        SFTLoader(_packed(seq_len=32), batch_size=2, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="too few for a global batch of 64 rows"):
        SFTLoader(rows, batch_size=64)
