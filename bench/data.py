"""Data stage throughput against the seed recipe's preprocessing, same data, same run.

    .venv/bin/python bench/data.py [--squad ../shared/data/squad/dev-v1.1.json.gz] [--questions N]

Both start from the flattened SQuAD dev set (10,570 questions; --questions N takes N of them, one
article after another, for a quick check) and the real GPT-2 tokenizer with the chat tokens, and end
with an Arrow dataset saved to disk:

* seed: `Dataset.map(batched=False)`, the prompt and the answer tokenized separately, each padded to
  512 tokens (the seed recipe's preprocessing, defects included);
* squadtune: `format_and_tokenize`'s batched chat encoder, nothing padded.

Each is timed --repeat times and its fastest run counts (the machine's other load only ever slows a
run down). Then the two stages run twice as a Prefect flow, and the second (cached) run's time is
reported. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Read when Prefect is first imported (the stage modules import it), before `local_defaults` runs:
# on a loaded machine the ephemeral server needs more than Prefect's default 20 s to start.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def seed_preprocess(dataset, tokenizer):
    """The seed recipe's preprocessing, defects included: one example at a time, the prompt and
    the answer tokenized separately, each padded to 512 tokens, `pad_token = eos_token`."""
    from squadtune.chat_format import CONTENT_ACK, GREETING, SYSTEM_PROMPT

    tokenizer.pad_token = tokenizer.eos_token

    def preprocess(example):
        prompt = (
            f"<|system|> {SYSTEM_PROMPT} <|end|>\n<|assistant|> {GREETING} <|end|>\n"
            f"<|user|> {example['context']} <|end|>\n<|assistant|> {CONTENT_ACK} <|end|>\n"
            f"<|user|> {example['question']} <|end|>\n<|assistant|> "
        )
        answer = example["answers"]["text"][0]
        inputs = tokenizer(
            prompt + answer + " <|end|>", padding="max_length", max_length=512, truncation=True
        )
        labels = tokenizer(answer, padding="max_length", max_length=512, truncation=True)
        inputs["labels"] = labels["input_ids"]
        return inputs

    return dataset.map(
        preprocess, batched=False, remove_columns=dataset.column_names, keep_in_memory=True
    )


def seed_recipe(dataset, tokenizer, out: Path) -> dict:
    start = time.perf_counter()
    mapped = seed_preprocess(dataset, tokenizer)
    mapped.save_to_disk(str(out))
    seconds = time.perf_counter() - start
    import pyarrow.compute as pc

    mask = pc.list_flatten(mapped.data.column("attention_mask"))
    return {
        "seconds": seconds,
        "examples": len(mapped),
        "bytes": dir_bytes(out),
        "padding_share": 1 - pc.sum(mask).as_py() / len(mask),
    }


def squadtune_stage(dataset, tokenizer, out: Path, num_proc: int) -> dict:
    from pipeline_config import DataConfig
    from tasks.format_tokenize import tokenize_split

    data = DataConfig(hub_dataset=None, train_files=["unused"], max_seq_len=512, num_proc=num_proc)
    start = time.perf_counter()
    mapped, stats = tokenize_split(dataset, tokenizer, data, drop=True)
    mapped.save_to_disk(str(out))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "examples": len(dataset),
        "kept": len(mapped),
        "bytes": dir_bytes(out),
        "padding_share": stats["padding_tokens"] / stats["tokens"],
    }


def question_sample(rows: list[dict], questions: int) -> list[dict]:
    """`questions` rows taken one article after another (round robin, in dev-set order), so
    that even a few of them span several articles: the data stage holds out whole articles."""
    articles: dict[str, list[dict]] = {}
    for row in rows:
        articles.setdefault(row["title"], []).append(row)
    picked, depth = [], 0
    while len(picked) < min(questions, len(rows)):
        picked += [a[depth] for a in articles.values() if depth < len(a)]
        depth += 1
    return picked[:questions]


def cached_rerun(squad_file: Path, work: Path) -> dict:
    """Both data stages as a Prefect flow, twice; the second run is all cache hits."""
    from tasks.tracking import local_defaults

    local_defaults(work / "state")
    from prefect import flow

    from pipeline_config import DataConfig, ModelConfig, PipelineConfig
    from tasks.format_tokenize import format_and_tokenize
    from tasks.load_squad import load_squad
    from tasks.stage import Run

    data = DataConfig(hub_dataset=None, train_files=[str(squad_file)])
    model = ModelConfig(name_or_path=None, tokenizer=str(SHARED / "gpt2-tokenizer"),
                        random_init={})
    config = PipelineConfig(data=data, model=model)

    @flow
    def data_stages(state: str) -> float:
        start = time.perf_counter()
        run = Run(config=config, state_dir=state)
        squad = load_squad(run)
        format_and_tokenize(run, squad)
        return time.perf_counter() - start

    first = data_stages(str(work / "state"))
    second = data_stages(str(work / "state"))
    return {"first_run_seconds": round(first, 2), "cached_run_seconds": round(second, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", default=str(SHARED / "squad" / "dev-v1.1.json.gz"))
    parser.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--questions", type=int, default=None,
                        help="use N questions of the file (default: all)")
    args = parser.parse_args()

    from datasets import Dataset

    from pipeline_config import ModelConfig
    from squadtune.squad_io import read_file, validate
    from tasks.format_tokenize import chat_tokenizer
    from tasks.load_squad import features

    rows, _ = read_file(Path(args.squad))
    good, _ = validate(rows, "bench", squad_v2=False, max_bad=0.0)
    if args.questions is not None:
        good = question_sample(good, args.questions)
    dataset = Dataset.from_list(good, features=features())
    model = ModelConfig(name_or_path=None, tokenizer=args.tokenizer, random_init={})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        squad_file = Path(args.squad)
        if args.questions is not None:  # the flow reads the same questions, in the hub schema
            squad_file = work / "questions.jsonl"
            squad_file.write_text("".join(json.dumps(r) + "\n" for r in good))
        def fastest(runs):
            return min(runs, key=lambda r: r["seconds"])

        seed = fastest(
            seed_recipe(dataset, chat_tokenizer(model)[0], work / f"seed{i}")
            for i in range(args.repeat)
        )
        ours = {
            n: fastest(
                squadtune_stage(dataset, chat_tokenizer(model)[0], work / f"ours{n}-{i}", n)
                for i in range(args.repeat)
            )
            for n in (1, 2)
        }
        best = min(ours, key=lambda n: ours[n]["seconds"])
        cache = cached_rerun(squad_file, work)
    seed_rate = seed["examples"] / seed["seconds"]
    result = {
        "bench": "data",
        "examples": seed["examples"],
        "repeat": args.repeat,
        "seed_examples_per_s": round(seed_rate, 1),
        "seed_bytes_per_example": round(seed["bytes"] / seed["examples"]),
        "seed_padding_share": round(seed["padding_share"], 4),
        **{
            f"squadtune_num_proc{n}_examples_per_s": round(r["examples"] / r["seconds"], 1)
            for n, r in ours.items()
        },
        "squadtune_bytes_per_example": round(ours[best]["bytes"] / ours[best]["kept"]),
        "squadtune_padding_share": ours[best]["padding_share"],
        "speedup": round(ours[best]["examples"] / ours[best]["seconds"] / seed_rate, 1),
        "goal_speedup": 10,
        **cache,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
