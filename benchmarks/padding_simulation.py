"""Padding waste of the TokenBudgetScheduler alone, on the realistic length mix, for batch limits
one would pick on a GPU: no model, no server, seconds on a CPU.

Documents wait in a queue kept at ``--queue-depth`` (a saturated server keeps it deep); each step
takes the scheduler's next batch and rounds its width up to ``pad_to_multiple_of`` as the engine
does. Waste is 1 − real tokens / padded tokens over all batches.

    .venv/bin/python -m benchmarks.padding_simulation [--budgets 8192,16384,32768] [--multiples 16,64]
"""
from __future__ import annotations

import argparse
import statistics
import sys

from patent_classifier_client.command_line import HelpFormatter
from core.hf_classifier import encode_texts
from core.synthetic_patents import synthetic_patents
from server.scheduler import ScheduledDocument, TokenBudgetScheduler


def waste(lengths: list[int], budget: int, batch_size: int, multiple: int, depth: int) -> tuple[float, int, float]:
    """(padding waste, batches, median padded tokens per batch)."""
    scheduler: TokenBudgetScheduler[None] = TokenBudgetScheduler(budget, batch_size, max(lengths), width_multiple=multiple)
    pending, real, padded, per_batch = list(lengths), 0, 0, []
    while pending or len(scheduler):
        while pending and len(scheduler) < depth:
            scheduler.admit([ScheduledDocument(pending.pop(0), None)])
        batch = scheduler.next_batch(0.0)
        real += batch.real_tokens
        padded += batch.padded_tokens
        per_batch.append(batch.padded_tokens)
    return 1 - real / padded, len(per_batch), statistics.median(per_batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.padding_simulation", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--tokenizer", default="build/demo/gemma2-base", help="a folder with the demo tokenizer")
    parser.add_argument("--documents", type=int, default=512, help="generated patents")
    parser.add_argument("--long-share", type=float, default=0.7, help="share of patents past the 512-token cap")
    parser.add_argument("--budgets", default="8192,16384,32768,65536", help="max_batch_tokens values, comma-separated")
    parser.add_argument("--batch-size", type=int, default=256, help="max_batch_size")
    parser.add_argument("--multiples", default="1,16,64", help="pad_to_multiple_of values, comma-separated")
    parser.add_argument("--queue-depths", default="512,128", help="documents kept waiting in the queue, comma-separated")
    args = parser.parse_args(argv)
    from core.hf_classifier import load_tokenizer

    texts = [d.render() for d in synthetic_patents(args.documents, seed=2, long_share=args.long_share)]
    lengths = [len(e.token_ids) for e in encode_texts(load_tokenizer(args.tokenizer), texts, 512)]
    print(f"{len(lengths)} patents, {sum(n == 512 for n in lengths) / len(lengths):.0%} at 512 tokens, "
          f"mean {statistics.mean(lengths):.0f}")
    print("| budget | width multiple | queue depth | padding waste | batches | median padded tokens per batch |")
    print("|---:|---:|---:|---:|---:|---:|")
    for budget in map(int, args.budgets.split(",")):
        for multiple in map(int, args.multiples.split(",")):
            for depth in map(int, args.queue_depths.split(",")):
                share, batches, median = waste(lengths, budget, args.batch_size, multiple, depth)
                print(f"| {budget:,} | {multiple} | {depth} | {share:.1%} | {batches} | {median:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
