"""The instruct format, kept as data in one place.

The conversation's fixed turns live here; the rendering lives in one Jinja `CHAT_TEMPLATE` that is
saved on the tokenizer, so `tokenizer.apply_chat_template(...)` on a saved tokenizer reproduces the
training prompt token for token. Training, evaluation and serving all build prompts through
`encode_example` / `encode_prompt` below.
"""

from __future__ import annotations

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
    from pipeline_config import stable_hash

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


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    context_truncated: bool
    answer_in_window: bool


def _render(tokenizer, turns, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(
    tokenizer, context: str, question: str, max_tokens: int
) -> tuple[list[int], str]:
    """Prompt ids ending in `<|assistant|>`, at most `max_tokens` long, and the context kept.

    When the prompt is too long the end of the context is cut, never the question.
    """
    ids = _render(tokenizer, conversation(context, question), add_generation_prompt=True)
    if len(ids) <= max_tokens:
        return ids, context
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    keep = len(context_ids) - (len(ids) - max_tokens)
    while keep > 0:
        kept = tokenizer.decode(context_ids[:keep]).rstrip()
        ids = _render(tokenizer, conversation(kept, question), add_generation_prompt=True)
        # Re-encoding a cut text can merge differently at the cut: trim more until it fits.
        if len(ids) <= max_tokens:
            return ids, kept
        keep -= len(ids) - max_tokens
    raise ValueError(
        f"the prompt without its context needs more than {max_tokens} tokens; raise "
        "data.max_seq_len or shorten the question"
    )


def encode_example(
    tokenizer, context: str, question: str, answer: str, answer_start: int, max_len: int
) -> Encoded:
    """Training ids and labels: -100 on the prompt, the answer and its `<|end|>` supervised."""
    prompt, kept = encode_prompt(tokenizer, context, question, 1 << 62)
    full = _render(tokenizer, conversation(context, question, answer), add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise AssertionError("the chat template does not render the prompt as a prefix")
    target = full[len(prompt) :]
    if len(full) > max_len:
        prompt, kept = encode_prompt(tokenizer, context, question, max_len - len(target))
    return Encoded(
        input_ids=prompt + target,
        labels=[-100] * len(prompt) + target,
        context_truncated=len(kept) < len(context),
        answer_in_window=answer_start + len(answer) <= len(kept),
    )
