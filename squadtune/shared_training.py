"""Shared-prefix training: a paragraph's questions in one sequence, and F1 while training.

A tokenized row (`tasks.format_tokenize`) is `system turns + context turns + question turn +
answer`, labels -100 except on the answer and its `<|end|>`. The rows of one paragraph repeat
everything up to the question's `<|user|>`; `pack_paragraphs` writes that *prefix* once and each
row's remainder (question, answer) as a *branch* after it:

    [prefix][branch 1][branch 2]...    position_ids: 0..P-1 | P..P+b1-1 | P..P+b2-1 | ...

`PackedCollator` turns the `branch` column into a 4D mask in which the prefix is causal, and a
branch token sees the prefix and the earlier tokens of its own branch, nothing else. Each token
therefore sees exactly the keys, values and positions it sees in its own unshared row, and its
loss is the unshared loss: with learned positions (GPT-2, OPT) and rotary ones (Llama, Qwen2,
...) alike, since both are read from `position_ids`, and in sliding-window layers too (the mask
counts the window in positions). The first id of every branch is a prompt id (label -100), so
the trainer's one-position label shift never makes one branch predict the next.

Contracts:

* Rows are grouped by paragraph (their system turns and first 64 context ids); the prefix is
  the longest run of ids they all start with, never past a row's question `<|user|>`. Where the
  tokenize stage cut a long context to different lengths for different questions, the prefix is
  the shortest cut and each branch starts with the rest of its own context.
* `max_seq_len` bounds a packed sequence (memory and attention cost), not positions: a branch's
  positions are those of its unshared row, so a pack may be longer than the model's window.
  Twice the tokenize stage's `max_seq_len` holds a typical paragraph's five questions whole. A
  paragraph whose questions do not fit is split, in order, into several sequences, each
  repeating the prefix; a row that does not fit with its prefix alone becomes a sequence alone.
* A dataset row is now a packed sequence: `per_device_train_batch_size` counts sequences (about
  `examples_per_row` examples each, see `packing_stats`), and `length` (its tokens) is what
  `group_by_length` groups. The loss is still the sum over supervised tokens divided by their
  count in the accumulated batch (`num_items_in_batch`), so every example weighs as before.
* Packing is deterministic (rows in order of first appearance), so a resumed run replays the
  same batches; steps count packed batches, so a checkpoint is only resumable by a run with the
  same packing setting (it must be part of the training stage's cache key).
* transformers passes a 4D `attention_mask` through untouched (`masking_utils`), so
  `include_num_input_tokens_seen="non_padding"` (which sums the mask) must become "all" here.

Wiring into a Trainer (the eval split too: one collator serves both):

    user = tokenizer.convert_tokens_to_ids(USER)
    train_ds = pack_paragraphs(train_ds, 2 * max_seq_len, user)
    trainer = answer_only_trainer()(..., train_dataset=train_ds,
        eval_dataset=pack_paragraphs(eval_ds, 2 * max_seq_len, user),
        data_collator=packed_collator(model.config, tokenizer.pad_token_id),
        callbacks=[f1_callback(tokenizer, questions, log, generation, every_steps)])
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from squadtune.modeling import Generation
from squadtune.shared_prefix import common_prefix_length

log = logging.getLogger(__name__)


def prefix_length(ids: list[int], labels: list[int], branch_token_id: int) -> int:
    """How many leading ids may be shared: up to the last `branch_token_id` before the first
    label (the `<|user|>` that opens the question turn)."""
    first = next((i for i, label in enumerate(labels) if label != -100), len(labels))
    head = ids[:first]
    return len(head) - head[::-1].index(branch_token_id) if branch_token_id in head else 0


def paragraph_key(ids: list[int], cut: int, branch_token_id: int, width: int = 64) -> tuple:
    """The ids up to `width` tokens past the first `branch_token_id` (the system turns and the
    start of the context): rows of one paragraph share it even where their contexts were cut
    to different lengths."""
    first = ids.index(branch_token_id) + 1 if branch_token_id in ids[:cut] else 0
    return tuple(ids[: min(cut, first + width)])


def _pack(prefix: list[int], rows: list[dict[str, Any]]) -> dict[str, Any]:
    p = len(prefix)
    out = {"ids": [], "input_ids": list(prefix), "labels": [-100] * p,
           "position_ids": list(range(p)), "branch": [0] * p}
    for k, row in enumerate(rows, start=1):
        branch = row["input_ids"][p:]
        out["ids"].append(row["id"])
        out["input_ids"] += branch
        out["labels"] += row["labels"][p:]
        out["position_ids"] += range(p, p + len(branch))
        out["branch"] += [k] * len(branch)
    out["length"] = len(out["input_ids"])
    out["examples"] = len(rows)
    return out


def pack_rows(rows: list[dict[str, Any]], max_seq_len: int, branch_token_id: int) -> list[dict]:
    """Packed sequences of tokenized rows (dicts with id, input_ids, labels), in order of each
    paragraph's first row."""
    groups: dict[tuple[int, ...], list[tuple[dict[str, Any], int]]] = {}
    for row in rows:
        cut = prefix_length(row["input_ids"], row["labels"], branch_token_id)
        key = paragraph_key(row["input_ids"], cut, branch_token_id)
        groups.setdefault(key, []).append((row, cut))
    packed = []
    for members in groups.values():
        # The shared prefix is the ids all rows start with, never past any row's question.
        p = min(common_prefix_length([r["input_ids"] for r, _ in members]),
                min(cut for _, cut in members))
        prefix, current, used = members[0][0]["input_ids"][:p], [], p
        for row, _ in members:
            size = len(row["input_ids"]) - p
            if current and used + size > max_seq_len:
                packed.append(_pack(prefix, current))
                current, used = [], p
            current.append(row)
            used += size
        packed.append(_pack(prefix, current))
    return packed


def pack_paragraphs(dataset, max_seq_len: int, branch_token_id: int):
    """A tokenized split (id, input_ids, labels, ...) as packed sequences: a `datasets.Dataset`
    with ids, input_ids, labels, position_ids, branch, length, examples."""
    from datasets import Dataset, Features, Sequence, Value

    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    rows = table.select(["id", "input_ids", "labels"]).to_pylist()
    ints = Sequence(Value("int32"))
    features = Features({
        "ids": Sequence(Value("string")), "input_ids": ints, "labels": ints,
        "position_ids": ints, "branch": Sequence(Value("int16")), "length": Value("int32"),
        "examples": Value("int32"),
    })
    packed = pack_rows(rows, max_seq_len, branch_token_id)
    return Dataset.from_list(packed, features=features)


def packing_stats(packed) -> dict[str, float]:
    """Examples, packed rows and tokens before/after: what sharing saves on this split."""
    examples = sum(packed["examples"])
    return {
        "examples": examples,
        "rows": len(packed),
        "examples_per_row": examples / max(1, len(packed)),
        "tokens": sum(packed["length"]),
    }


def block_mask(branch: torch.Tensor, dtype: torch.dtype = torch.float32,
               positions: torch.Tensor | None = None,
               windows: dict[str | None, int | None] | None = None):
    """(batch, 1, L, L) additive mask from branch ids (0 prefix, k >= 1 branch k, -1 padding).

    Additive (0 or the dtype's minimum) because transformers passes a 4D mask through as is:
    SDPA takes it, and the eager attention adds it to the scores (a boolean there would be
    added as 0/1 and mask nothing). Padding attends to padding only, so no row is all masked
    (an all-masked softmax row is NaN, and NaN reaches the gradients). With `windows`
    (`architectures.layer_windows`), a sliding-window layer type's mask also drops keys a
    window or more *positions* back, as in the unshared row; a model whose layer types differ
    takes a dict of masks by type.
    """
    from squadtune.architectures import attention_masks

    length = branch.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=branch.device).tril()
    query, key = branch[:, :, None], branch[:, None, :]
    allowed = causal & ((query == key) | ((key == 0) & (query > 0)))
    if positions is None:
        positions = torch.arange(length, device=branch.device)[None].expand(len(branch), -1)
    return attention_masks(allowed, positions, positions, windows or {None: None}, dtype)


class PackedCollator:
    """Pads packed rows into input_ids, labels (-100), position_ids and the 4D block mask
    (a mask per layer type where the model's layers differ: `windows`, from
    `architectures.layer_windows` of the base model's config)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None,
                 mask_dtype: torch.dtype = torch.float32,
                 windows: dict[str | None, int | None] | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.mask_dtype = mask_dtype
        self.windows = windows

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple

        def column(name: str, fill: int) -> torch.Tensor:
            rows = [list(f[name]) + [fill] * (width - len(f[name])) for f in features]
            return torch.tensor(rows, dtype=torch.long)

        positions = column("position_ids", 0)
        return {
            "input_ids": column("input_ids", self.pad_token_id),
            "attention_mask": block_mask(column("branch", -1), self.mask_dtype, positions,
                                         self.windows),
            "position_ids": positions,
            "labels": column("labels", -100),
        }


def packed_collator(base_config, pad_token_id: int, pad_to_multiple_of: int | None = None):
    """The `PackedCollator` for a base model of this config, or None (and one logged line
    saying why) when the model cannot take the block mask: train unshared then."""
    from squadtune.architectures import layer_windows, shared_prefix_problem

    problem = shared_prefix_problem(base_config)
    if problem is not None:
        log.warning("training.share_context is ignored, training unshared rows: %s", problem)
        return None
    return PackedCollator(pad_token_id, pad_to_multiple_of, windows=layer_windows(base_config))


def f1_callback(
    tokenizer,
    questions,
    log: Callable[[dict[str, float], int], None],
    generation: Generation,
    every_steps: int | None = None,
    refusal: str | None = None,
):
    """A `TrainerCallback` that answers held-out `questions` (id, context, question, answers)
    with shared-prefix greedy generation and calls `log({"eval/exact_match", "eval/f1"}, step)`.

    It runs in `on_step_end` every `every_steps` optimizer steps (default: `args.eval_steps`),
    and once before the first step of a run that starts at step 0, so the curve starts at the
    untrained adapter. It does not need an eval dataset or `eval_strategy`. Only the main
    process generates (the others wait at their next collective).
    """
    from transformers import TrainerCallback

    from squadtune.chat_format import REFUSAL
    from squadtune.metrics import score
    from squadtune.modeling import generate_answers

    ids, contexts = list(questions["id"]), list(questions["context"])
    texts, golds = list(questions["question"]), list(questions["answers"])

    def answer_and_log(model, step: int) -> None:
        was_training = model.training
        model.eval()
        try:
            answers = generate_answers(model, tokenizer, contexts, texts, generation)
        finally:
            model.train(was_training)
        scores = score(ids, golds, answers, refusal or REFUSAL)
        log({"eval/exact_match": scores["exact_match"], "eval/f1": scores["f1"]}, step)

    class F1WhileTraining(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and state.is_world_process_zero:
                answer_and_log(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            every = every_steps or args.eval_steps
            if every and state.global_step % every == 0 and state.is_world_process_zero:
                answer_and_log(model, state.global_step)

    return F1WhileTraining()
