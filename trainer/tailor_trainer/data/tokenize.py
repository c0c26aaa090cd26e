"""Rows -> (input_ids, labels, prompt, reference) with the job's tokenizer.

Loss is taken only on what the model should learn to write:
  text         every token
  completion   the completion (prompt tokens are -100)
  instruction  the output, after an Alpaca-style prompt built from instruction and input
  chat         assistant turns only, including the template's end-of-turn marker; system, user
               and tool turns and the template's role headers are -100
An EOS token ends every example (unless the text already ends with it).

Chat masking works on characters: the conversation is rendered once with the model's chat
template, each assistant turn's character span is found by rendering the prefix before it
(with the generation prompt) and the prefix through it, and a token is labelled when it starts
inside a span (fast tokenizers give character offsets). This works for any template whose
renderings of prefixes are prefixes of the whole, which is what ``add_generation_prompt`` is
for; for templates that rewrite earlier turns the assistant contents are located by search.
"""

from __future__ import annotations

from typing import Any, Optional

from tailor_trainer.config import DataSchema
from tailor_trainer.data import DataError
from tailor_trainer.data.rows import Fields

IGNORE_INDEX = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def instruction_prompt(fields: Fields) -> str:
    template = ALPACA_WITH_INPUT if fields["input"].strip() else ALPACA_NO_INPUT
    return template.format(instruction=fields["instruction"], input=fields["input"])


Encoded = tuple[list[int], list[int], Optional[str], Optional[str]]


class Encoder:
    """Tokenizes batches of cleaned rows of one schema."""

    def __init__(self, tokenizer: Any, schema: DataSchema):
        self.tok = tokenizer
        self.schema = schema
        self.eos = tokenizer.eos_token_id
        if schema is DataSchema.chat and not getattr(tokenizer, "chat_template", None):
            raise DataError("NoChatTemplate", "schema chat needs a tokenizer with a chat template; "
                            "this model's tokenizer has none (use schema completion or instruction)")

    def _backend(self) -> Any:
        """The Rust tokenizer, when calling it directly gives what ``tok(...)`` gives (no
        truncation or padding configured on it): skips transformers' per-row wrapping."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        return backend

    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        backend = self._backend()
        if backend is not None:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special)]
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def _ids_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        backend = self._backend()
        if backend is not None:
            return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def _end(self, ids: list[int], labels: list[int]) -> None:
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
            labels.append(self.eos)

    def encode(self, rows: list[Fields]) -> list[Encoded]:
        if self.schema is DataSchema.text:
            out = []
            for ids in self._ids([r["text"] for r in rows], True):
                ids = list(ids)
                labels = list(ids)
                self._end(ids, labels)
                out.append((ids, labels, None, None))
            return out
        if self.schema is DataSchema.chat:
            return self._encode_chat(rows)
        if self.schema is DataSchema.completion:
            prompts = [r["prompt"] for r in rows]
            answers = [r["completion"] for r in rows]
        else:
            prompts = [instruction_prompt(r) for r in rows]
            answers = [r["output"] for r in rows]
        out = []
        for p, a, prompt, answer in zip(self._ids(prompts, True), self._ids(answers, False), prompts, answers):
            ids = list(p) + list(a)
            labels = [IGNORE_INDEX] * len(p) + list(a)
            self._end(ids, labels)
            out.append((ids, labels, prompt, answer))
        return out

    # -- chat ------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def assistant_spans(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        spans = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                before = self.render(messages[:i], True) if i else ""
                through = self.render(messages[: i + 1])
            except Exception:  # a template may refuse a prefix (e.g. must start with user)
                before = through = None
            if before is not None and full.startswith(before) and full.startswith(through) \
                    and len(before) <= len(through):
                spans.append((len(before), len(through)))
                cursor = len(through)
                continue
            pos = full.find(m["content"], cursor)
            if pos < 0:
                raise DataError("ChatTemplateMismatch", "cannot locate assistant turns in the rendered "
                                "chat template output; the template rewrites message content")
            spans.append((pos, pos + len(m["content"])))
            cursor = pos + len(m["content"])
        return spans

    def _encode_chat(self, rows: list[Fields]) -> list[Encoded]:
        fulls = [self.render(r["messages"]) for r in rows]
        out = []
        for row, full, (ids, offsets) in zip(rows, fulls, self._ids_offsets(fulls)):
            messages = row["messages"]
            spans = self.assistant_spans(messages, full)
            ids = list(ids)
            labels = [t if end > start and any(a <= start < b for a, b in spans) else IGNORE_INDEX
                      for t, (start, end) in zip(ids, offsets)]
            self._end(ids, labels)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            out.append((ids, labels, self.render(messages[:last], True), messages[last]["content"]))
        return out
