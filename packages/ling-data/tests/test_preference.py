"""DPO pairs from `ling-data kg` samples: what each near miss changes, and how pairs are packed."""

from __future__ import annotations

import json

import pytest

from ling_data import DataError, Tokenizer
from ling_data.kg.cli import main as kg_main
from ling_data.kg.preference import NEAR_MISSES, preference_pairs, read_preference_pairs
from ling_data.sft import IGNORE_INDEX, encode_samples, loss_spans, pack_pairs
from ling_data.tokenizer import CHAT_TEMPLATE_SYMBOLS


@pytest.fixture(scope="module")
def kg_rows(tmp_path_factory) -> tuple[list[dict], object]:
    out = tmp_path_factory.mktemp("kg")
    assert kg_main(["--out", str(out), "--samples-per-pattern", "2", "--tool-list", "signatures"]) == 0
    path = out / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()], path


def test_each_pair_shares_the_prompt_and_differs_only_in_the_next_turn(kg_rows):
    rows, path = kg_rows
    pairs = read_preference_pairs(path, seed=3)
    assert {p.kind for p in pairs} == set(NEAR_MISSES)
    by_source = {f"{path}:{n}": row for n, row in enumerate(rows, 1)}
    for pair in pairs:
        row = by_source[pair.chosen.source]
        (start,) = pair.chosen.prompt_chars
        assert pair.rejected.prompt_chars == (start,)
        assert row["text"].startswith(pair.chosen.text)  # the gold sample, cut after the turn
        assert pair.rejected.text[:start] == pair.chosen.text[:start]
        assert pair.rejected.text[start:] != pair.chosen.text[start:]
        chosen_turn, rejected_turn = pair.chosen.text[start:], pair.rejected.text[start:]
        (span,) = loss_spans(pair.chosen)  # the loss covers exactly that one turn
        assert pair.chosen.text[span[0]:span[1]] == chosen_turn
        if pair.kind == "wrong_answer":
            assert row["answer"] in chosen_turn and row["answer"] not in rejected_turn
        elif pair.kind == "wrong_tool":
            gold = row["calls"][pair.turn]
            assert gold["name"] in chosen_turn and gold["name"] not in rejected_turn
            assert all(json.dumps(v) in rejected_turn or str(v) in rejected_turn for v in gold["arguments"].values())
        elif pair.kind == "missing_hop":
            skipped = row["calls"][pair.turn]
            assert skipped["name"] in chosen_turn


def test_pairs_are_drawn_by_the_seed(kg_rows):
    rows, _ = kg_rows
    assert preference_pairs(rows, seed=1) == preference_pairs(rows, seed=1)
    assert preference_pairs(rows, seed=1) != preference_pairs(rows, seed=2)
    with pytest.raises(ValueError, match="unknown near-miss kinds"):
        preference_pairs(rows, kinds=("wrong_colour",))


def test_rows_without_the_gold_chain_are_bad_input(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"text": "<|im_start|>system\nx<|im_end|>\n", "format": "json"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: missing id, pattern, question, calls, answer"):
        read_preference_pairs(path)


@pytest.fixture(scope="module")
def chat_tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    return Tokenizer.train(corpus[:40], 600, tmp_path_factory.mktemp("tok") / "chat.model",
                           user_defined_symbols=CHAT_TEMPLATE_SYMBOLS)


def test_pack_pairs_puts_chosen_and_rejected_in_their_own_segments(kg_rows, chat_tokenizer):
    rows, path = kg_rows
    pairs = read_preference_pairs(path)[:6]
    chosen = encode_samples(chat_tokenizer, [p.chosen for p in pairs])
    rejected = encode_samples(chat_tokenizer, [p.rejected for p in pairs])
    seq_len = max(len(c.ids) + len(r.ids) for c, r in zip(chosen, rejected))
    packed = pack_pairs(zip(chosen, rejected), seq_len, chat_tokenizer.pad_id)
    assert len(packed) == len(pairs)
    for row, (c, r) in enumerate(zip(chosen, rejected)):
        segments = packed.segment_ids[row]
        for segment, sample in ((1, c), (2, r)):
            where = segments == segment
            assert packed.input_ids[row][where].tolist() == list(sample.ids)
            labels = packed.labels[row][where]
            assert (labels != IGNORE_INDEX).sum() == sum(sample.loss_mask[1:])  # the turn's tokens only
        assert (packed.input_ids[row][segments == 0] == chat_tokenizer.pad_id).all()
    with pytest.raises(DataError, match=rf"{path}:\d+: the pair \(chosen \+ rejected\) is \d+ tokens, longer than "
                                        rf"seq_len {seq_len - 1}"):
        longest = max(range(len(pairs)), key=lambda i: len(chosen[i].ids) + len(rejected[i].ids))
        pack_pairs([(chosen[longest], rejected[longest])], seq_len - 1, chat_tokenizer.pad_id)


def test_samples_without_a_tool_list_open_with_the_question_and_still_make_pairs(tmp_path):
    """`--tool-list none`: no system turn, so the text opens with the user's turn; the near
    misses re-render it without one, and their prompts are the gold sample's."""
    assert kg_main(["--out", str(tmp_path), "--samples-per-pattern", "1", "--tool-list", "none",
                    "--patterns", "capital,neighbour_count"]) == 0
    path = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and all(row["text"].startswith("<|im_start|>user\n" + row["question"]) for row in rows)
    pairs = read_preference_pairs(path, seed=0)
    assert pairs
    for pair in pairs:
        assert pair.chosen.text.startswith("<|im_start|>user\n")
        (start,) = pair.chosen.prompt_chars
        assert pair.rejected.text[:start] == pair.chosen.text[:start]
