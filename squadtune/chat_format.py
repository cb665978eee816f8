"""The instruct format, kept as data in one place.

The conversation's fixed turns live here; the rendering lives in one Jinja `CHAT_TEMPLATE` that is
saved on the tokenizer, so `tokenizer.apply_chat_template(...)` on a saved tokenizer reproduces the
training prompt token for token. Training, evaluation and serving all build token ids through
`ChatEncoder` below, a batched equivalent of `apply_chat_template` (tests check them equal).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = (SYSTEM, USER, ASSISTANT, END)

SYSTEM_PROMPT = (
    'You are a question answer assistant chatbot named "QA Bot". Answer the question about the '
    "content the user provides with a short span copied from that content. If the question is not "
    'about the content, answer "I specialize only in content related queries".'
)
GREETING = "QA Bot here! Ask me anything related to the content you provide. Content only, though!"
CONTENT_ACK = "Ask questions regarding this content."
REFUSAL = "I specialize only in content related queries"

# One turn renders as `<|role|> content <|end|>`, turns joined by newlines. `<|end|>` strips the
# space before it (AddedToken lstrip), so an answer is supervised as ` answer<|end|>` with no
# dangling space token, and the generation prompt ends right after `<|assistant|>`.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n' }}{% endif -%}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\\n' }}<|assistant|>{% endif -%}"
)


def format_fingerprint() -> str:
    """Changes whenever anything the model sees of the format changes (part of cache keys)."""
    from squadtune.hashing import stable_hash

    return stable_hash([CHAT_TEMPLATE, SPECIAL_TOKENS, SYSTEM_PROMPT, GREETING, CONTENT_ACK])


def conversation(context: str, question: str, answer: str | None = None) -> list[dict[str, str]]:
    """The chat turns of one SQuAD question; with `answer`, the full training conversation."""
    turns = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "assistant", "content": GREETING},
        {"role": "user", "content": context},
        {"role": "assistant", "content": CONTENT_ACK},
        {"role": "user", "content": question},
    ]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def add_chat_tokens(tokenizer) -> list[int]:
    """Register the chat tokens and template on `tokenizer`; returns the ids of the new tokens."""
    from transformers import AddedToken

    before = len(tokenizer)
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(tok, lstrip=tok == END, rstrip=False, normalized=False, special=True)
                for tok in SPECIAL_TOKENS
            ]
        },
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        # Padding is always masked (attention mask 0, label -100), so reusing EOS costs nothing
        # and adds no embedding row; the stop token is <|end|>, never EOS.
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    return [i for i in ids if i >= before]


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at `<|end|>`, or EOS as a fallback."""
    ids = [tokenizer.convert_tokens_to_ids(END)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class PromptTooLong(ValueError):
    """The question (and answer) alone do not fit the token budget."""


# Characters from Unicode's private-use area mark where the variable parts sit in a rendered
# template; the text between them is the format's fixed part.
_SLOTS = {"context": "\ue000", "question": "\ue001", "answer": "\ue002"}


@dataclass
class _Fixed:
    head: str  # text before the first special token
    middle: list[int]  # ids from the first to the last special token
    tail: str  # text after the last special token
    first_lstrip: bool  # the first special token eats whitespace on its left
    last_rstrip: bool


class ChatEncoder:
    """Batched encoding of SQuAD examples in the chat format, equal to `apply_chat_template`.

    The template is rendered once with placeholders, so its fixed parts are tokenized once; per
    example only the context, question and answer are tokenized, in batches by the fast tokenizer.
    Special tokens split the text, so a variable's segment (with the whitespace around it that a
    neighbouring `lstrip`/`rstrip` token removes) tokenizes the same alone as inside the prompt.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
        self._special = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len)[::-1]))
        self._tokens = specials
        full = tokenizer.apply_chat_template(
            conversation(_SLOTS["context"], _SLOTS["question"], _SLOTS["answer"]), tokenize=False
        )
        prompt = tokenizer.apply_chat_template(
            conversation(_SLOTS["context"], _SLOTS["question"]),
            tokenize=False,
            add_generation_prompt=True,
        )
        self.full = [self._fixed(p) for p in re.split("[\ue000-\ue002]", full)]
        self.prompt = [self._fixed(p) for p in re.split("[\ue000-\ue002]", prompt)]
        if len(self.full) != 4 or len(self.prompt) != 3:
            raise ValueError("the chat template must contain context, question and answer once")

    def _fixed(self, text: str) -> _Fixed:
        found = list(self._special.finditer(text))
        if not found:
            raise ValueError(f"fixed template text {text!r} holds no special token to split on")
        first, last = found[0], found[-1]
        middle = text[first.start() : last.end()]
        return _Fixed(
            head=text[: first.start()],
            middle=self.tokenizer(middle, add_special_tokens=False)["input_ids"],
            tail=text[last.end() :],
            first_lstrip=self._tokens[first.group()].lstrip,
            last_rstrip=self._tokens[last.group()].rstrip,
        )

    @staticmethod
    def _segments(before: _Fixed, values: list[str], after: _Fixed) -> tuple[list[str], int]:
        """The texts between two special tokens, and where each value starts in its text."""
        prefix = before.tail.lstrip() if before.last_rstrip else before.tail
        texts = [prefix + value + after.head for value in values]
        if after.first_lstrip:
            texts = [text.rstrip() for text in texts]
        return texts, len(prefix)

    def _tokenize(self, texts: list[str], offsets: bool):
        """ids (and char offsets) of each text, straight from the Rust tokenizer when there is
        one: transformers' per-encoding conversion costs more than the tokenizing itself, and
        `encode_batch_fast` skips the offsets most callers do not need."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
            return enc["input_ids"], enc.get("offset_mapping")
        if offsets:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encodings], [e.offsets for e in encodings]
        fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in fast(texts, add_special_tokens=False)], None

    def _encode(self, fixed: list[_Fixed], columns: list[list[str]]):
        """Per slot: each row's segment ids and where values start in their segment."""
        slots, texts = [], []
        for slot, values in enumerate(columns):
            # SQuAD asks ~5 questions per paragraph: tokenize each distinct text once.
            distinct = list(dict.fromkeys(values))
            segments, start = self._segments(fixed[slot], distinct, fixed[slot + 1])
            slots.append((values, distinct, start, len(texts)))
            texts.extend(segments)
        ids, _ = self._tokenize(texts, offsets=False)  # one call keeps both cores busy
        encoded = []
        for values, distinct, start, first in slots:
            slot_ids = ids[first : first + len(distinct)]
            if len(distinct) < len(values):
                row_of = {v: i for i, v in enumerate(distinct)}
                slot_ids = [slot_ids[row_of[v]] for v in values]
            encoded.append((slot_ids, start))
        return encoded

    def _edges(self, fixed: list[_Fixed]) -> tuple[list[int], list[int]]:
        head = self.tokenizer(fixed[0].head, add_special_tokens=False)["input_ids"]
        tail = self.tokenizer(fixed[-1].tail, add_special_tokens=False)["input_ids"]
        return head + fixed[0].middle, fixed[-1].middle + tail

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one paragraph's questions come together
    def _context_spans(self, context: str) -> tuple[list[tuple[int, int]], int]:
        texts, start = self._segments(self.full[0], [context], self.full[1])
        return self._tokenize(texts, offsets=True)[1][0], start

    def _kept_chars(self, context: str, keep: int) -> int:
        """How many characters of `context` its first `keep` tokens cover."""
        if keep <= 0:
            return 0
        spans, start = self._context_spans(context)
        return spans[keep - 1][1] - start

    def examples(
        self,
        contexts: list[str],
        questions: list[str],
        answers: list[str],
        answer_starts: list[int | None],
        max_len: int,
    ) -> dict[str, list]:
        """Training rows: ids, prompt lengths (the labels are -100 there, the ids after it),
        truncation flags and drop reasons."""
        (ctx, _), (qs, _), (ans, _) = self._encode(
            self.full, [contexts, questions, answers]
        )
        lead, end = self._edges(self.full)
        mid1, mid2 = self.full[1].middle, self.full[2].middle
        fixed = len(lead) + len(mid1) + len(mid2) + len(end)
        out: dict[str, list] = {"input_ids": [], "prompt_length": [], "truncated": [], "drop": []}
        for i, context_ids in enumerate(ctx):
            keep = min(len(context_ids), max_len - fixed - len(qs[i]) - len(ans[i]))
            drop = None
            if keep < 0:
                drop, keep = "question and answer alone exceed max_seq_len", 0
            elif (
                answer_starts[i] is not None
                and keep < len(context_ids)
                and answer_starts[i] + len(answers[i]) > self._kept_chars(contexts[i], keep)
            ):
                drop = "answer outside the kept context window"
            ids = lead + context_ids[:keep]
            ids += mid1
            ids += qs[i]
            ids += mid2
            out["prompt_length"].append(len(ids))
            ids += ans[i]
            ids += end
            out["input_ids"].append(ids)
            out["truncated"].append(keep < len(context_ids))
            out["drop"].append(drop)
        return out

    def prompts(
        self, contexts: list[str], questions: list[str], max_len: int, truncate: bool = True
    ) -> list[list[int]]:
        """Generation prompts ending in `<|assistant|>`; the context is cut to fit `max_len`
        (or, with `truncate=False`, a `PromptTooLong` names the first one that does not fit)."""
        (ctx, _), (qs, _) = self._encode(self.prompt, [contexts, questions])
        lead, end = self._edges(self.prompt)
        mid = self.prompt[1].middle
        prompts = []
        for i, context_ids in enumerate(ctx):
            rest = len(lead) + len(mid) + len(qs[i]) + len(end)
            keep = max_len - rest
            if keep < 0 or (not truncate and keep < len(context_ids)):
                raise PromptTooLong(
                    f"row {i}: the prompt needs {rest + len(context_ids)} tokens, over the "
                    f"{max_len} this model has for a prompt; send a shorter "
                    f"{'context' if keep >= 0 else 'question'}"
                )
            prompts.append(lead + context_ids[:keep] + mid + qs[i] + end)
        return prompts
