"""Write a few questions of a SQuAD file as a SQuAD v1.1 file of their own.

`make memorize` uses it to pick the questions the memorize config trains and evaluates on:

    python -m flows.sample_squad ../shared/data/squad/dev-v1.1.json.gz .squadtune/memorize.json \
        --questions 6 --article 5
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path


def sample(doc: dict, questions: int, article: int) -> dict:
    """The first `questions` questions of article `article` (0-based), in paragraph order."""
    articles = doc.get("data") or []
    if not 0 <= article < len(articles):
        raise ValueError(f"--article {article}: the file has articles 0..{len(articles) - 1}")
    source = articles[article]
    paragraphs, left = [], questions
    for paragraph in source["paragraphs"]:
        if left <= 0:
            break
        qas = paragraph["qas"][:left]
        left -= len(qas)
        paragraphs.append({"context": paragraph["context"], "qas": qas})
    return {"version": "1.1", "data": [{"title": source["title"], "paragraphs": paragraphs}]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.sample_squad", description=__doc__)
    p.add_argument("source", help="SQuAD JSON or JSON.gz")
    p.add_argument("out", help="where to write the sample (SQuAD v1.1 JSON)")
    p.add_argument("--questions", type=int, default=6, help="how many questions (default 6)")
    p.add_argument("--article", type=int, default=0, help="which article, 0-based (default 0)")
    args = p.parse_args(argv)
    opener = gzip.open if args.source.endswith(".gz") else open
    try:
        with opener(args.source, "rt") as fh:
            doc = json.load(fh)
        out = sample(doc, args.questions, args.article)
    except (OSError, ValueError) as exc:
        print(f"sample_squad: {args.source}: {exc}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    count = sum(len(p["qas"]) for p in out["data"][0]["paragraphs"])
    print(f"wrote {count} questions of '{out['data'][0]['title']}' to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
