"""Tokenization with a real (tiny) tokenizer: label masks per schema, checked token by token;
overlong rows; packing with position_ids that restart per document."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tailor_trainer.config import DataSchema, ResolvedDataset
from tailor_trainer.data.engine import PrepOptions, prepare
from tailor_trainer.data.tokenize import IGNORE_INDEX, Encoder, instruction_prompt

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "How do I reset my password?"},
    {"role": "assistant", "content": "Open settings."},
    {"role": "user", "content": "Then?"},
    {"role": "assistant", "content": "Choose reset password."},
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_labels_only_on_assistant_turns_token_by_token(tok):
    ids, labels, prompt, reference = Encoder(tok, DataSchema.chat).encode([{"messages": CHAT}])[0]
    # Oracle built piece by piece: special tokens separate the pieces, so pieces tokenize alone.
    want_ids, want_labels = [tok.bos_token_id], [IGNORE_INDEX]
    for m in CHAT:
        head = enc(tok, "<|im_start|>" + m["role"] + "\n")
        body = enc(tok, m["content"]) + enc(tok, "<|im_end|>") + enc(tok, "\n")
        want_ids += head + body
        want_labels += [IGNORE_INDEX] * len(head)
        want_labels += body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body)
    want_ids.append(tok.eos_token_id)
    want_labels.append(tok.eos_token_id)
    assert ids == want_ids
    for i, (got, want) in enumerate(zip(labels, want_labels)):
        assert got == want, f"token {i} {tok.convert_ids_to_tokens(ids[i])!r}: label {got}, want {want}"
    assert len(labels) == len(want_labels)
    learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "Open settings.<|im_end|>\nChoose reset password.<|im_end|>\n</s>"
    assert prompt == tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and reference == "Choose reset password."


def test_chat_template_that_rewrites_history_falls_back_to_search(tok):
    class Rewriting:  # a template that drops earlier assistant turns from prefixes
        def __init__(self, inner):
            self.inner = inner
            self.eos_token_id = inner.eos_token_id
            self.chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = self.inner.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
            return text if len(messages) == len(CHAT) else "REWRITTEN" + text

        def __call__(self, *a, **k):
            return self.inner(*a, **k)

    ids, labels, _, _ = Encoder(Rewriting(tok), DataSchema.chat).encode([{"messages": CHAT}])[0]
    learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "Open settings.Choose reset password.</s>"


def test_completion_and_instruction_mask_the_prompt(tok):
    row = {"prompt": "Capital of France?", "completion": " Paris"}
    ids, labels, prompt, ref = Encoder(tok, DataSchema.completion).encode([row])[0]
    p = tok(row["prompt"])["input_ids"]  # with BOS
    c = enc(tok, row["completion"]) + [tok.eos_token_id]
    assert ids == p + c and labels == [IGNORE_INDEX] * len(p) + c
    assert (prompt, ref) == ("Capital of France?", " Paris")

    row = {"instruction": "Summarize.", "input": "A long text.", "output": "Short."}
    ids, labels, prompt, ref = Encoder(tok, DataSchema.instruction).encode([row])[0]
    assert prompt == instruction_prompt(row) and "### Input:\nA long text." in prompt
    p = tok(prompt)["input_ids"]
    assert labels[: len(p)] == [IGNORE_INDEX] * len(p)
    assert labels[len(p):] == enc(tok, "Short.") + [tok.eos_token_id]
    assert "### Input" not in instruction_prompt({**row, "input": ""})


def test_text_learns_every_token_and_ends_with_eos(tok):
    ids, labels, prompt, ref = Encoder(tok, DataSchema.text).encode([{"text": "Hello world"}])[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and labels == ids
    assert prompt is None and ref is None


def test_chat_needs_a_template(tok, tmp_path):
    from tailor_trainer.data import DataError

    class NoTemplate:
        chat_template = None
        eos_token_id = 2

    with pytest.raises(DataError) as e:
        Encoder(NoTemplate(), DataSchema.chat)
    assert e.value.reason == "NoChatTemplate"


def _write(tmp_path, rows) -> ResolvedDataset:
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ResolvedDataset.model_validate({"name": "t", "source": {"uri": str(f)}, "schema": "text",
                                           "split": {"validation": 0.0, "test": 0.0}})


def _read(path):
    return pq.read_table(path).to_pylist()


def test_overlong_truncate_or_drop(tok, tmp_path):
    rows = [{"text": "Hello world"}, {"text": " ".join(["How do I reset my password?"] * 8)},
            {"text": "Fine."}]
    d = _write(tmp_path, rows)
    lengths = sorted(len(tok(r["text"])["input_ids"]) + 1 for r in rows)
    limit = lengths[1]  # exactly one row (the long one) is over
    out = tmp_path / "trunc"
    r = prepare(d, PrepOptions(tokenizer=tok, max_seq_length=limit, out_dir=str(out)))
    assert r.error is None and r.rows == 3 and r.over_limit == 1 and "overlong" not in r.dropped
    got = _read(out / "train.parquet")
    assert max(len(x["input_ids"]) for x in got) == limit
    stats = r.token_stats()
    assert stats["max"] == lengths[2] and stats["overLimit"] == 1
    assert stats["total"] == lengths[0] + lengths[1] + limit
    r = prepare(d, PrepOptions(tokenizer=tok, max_seq_length=limit, overlong="drop",
                               out_dir=str(tmp_path / "drop")))
    assert r.rows == 2 and r.dropped["overlong"] == 1 and r.over_limit == 1


def test_packing_restarts_positions_per_document(tok, tmp_path):
    rows = [{"text": f"Row {i}: the quick brown fox jumps over the lazy dog {i}."} for i in range(12)]
    d = _write(tmp_path, rows)
    plain = prepare(d, PrepOptions(tokenizer=tok, max_seq_length=64, out_dir=str(tmp_path / "plain")))
    packed = prepare(d, PrepOptions(tokenizer=tok, max_seq_length=64, packing=True,
                                    out_dir=str(tmp_path / "packed")))
    docs = _read(tmp_path / "plain" / "train.parquet")
    seqs = _read(tmp_path / "packed" / "train.parquet")
    assert packed.rows == plain.rows == 12 and packed.sequences["train"] == len(seqs) < 12
    assert all(len(s["input_ids"]) <= 64 for s in seqs)
    rebuilt = []
    for s in seqs:
        assert len(s["position_ids"]) == len(s["input_ids"]) == len(s["labels"])
        starts = [i for i, p in enumerate(s["position_ids"]) if p == 0]
        assert starts[0] == 0
        bounds = starts + [len(s["input_ids"])]
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            assert s["position_ids"][a:b] == list(range(b - a))
            # No loss on a document's first token predicted from the previous document.
            if k > 0:
                assert s["labels"][a] == IGNORE_INDEX
            rebuilt.append(s["input_ids"][a:b])
    # the same documents, nothing lost (best-fit decreasing places them longest first)
    assert sorted(rebuilt) == sorted(d["input_ids"] for d in docs)
