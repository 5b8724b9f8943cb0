"""Where the PyTorch engine's forward passes spend their time: torch's profiler on the batches the
engine forms with 1 and with 8 patents in flight, for transformers' padded forward and for the
packed one (core/packed_decoder.py), in each precision asked.

With 1 in flight every batch is one patent; with 8, the engine's scheduler (the real
``TokenBudgetScheduler``, ``--max-batch-tokens``) groups the 8 waiting patents into batches, as
it does in service. Each case runs the same patents (``--long-share`` of them at the 512-token
cap), then once more under the profiler; it prints samples/s, padding waste, MFU and the
operators that took the most time.

MFU's ceiling for a forward pass: the FLOPs it needed over the time its projections (the dense
matmuls, which compute every FLOP that MFU counts) took, as a share of the run's best matmul in
the same precision (``benchmarks.model_flops``). That is the MFU the forward would reach if
nothing else (attention, norms, conversions, Python) took any time: no change outside the
matmuls can lift MFU above it.

    python -m benchmarks.engine_profile --model-dir build/bench_repository/gemma2-bench/1/model \\
        [--dtypes bfloat16,float32] [--layouts padded,packed] [--documents 16] [--max-batch-tokens 1024] [--rows 12]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def batches_in_flight(lengths: list[int], in_flight: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices of the patents in each forward pass when ``in_flight`` wait at a time (refilled as
    batches leave), chosen by the engine's scheduler."""
    from server.scheduler import ScheduledDocument, TokenBudgetScheduler

    scheduler = TokenBudgetScheduler(max_batch_tokens, 64, max(lengths))
    batches, next_index = [], 0
    while next_index < len(lengths) or len(scheduler):
        while len(scheduler) < in_flight and next_index < len(lengths):
            scheduler.admit([ScheduledDocument(lengths[next_index], next_index)])
            next_index += 1
        batch = scheduler.next_batch(time.monotonic())
        batches.append([document.payload for document in batch.documents])
    return batches


# The profiler's names for the projections' matmuls: oneDNN's on packed weights (the packed
# forward), torch's (transformers' forward, and the packed forward's pooled rows and head).
PROJECTION_OPERATORS = frozenset({"mkldnn::_linear_pointwise", "aten::mm", "aten::addmm"})


def projection_share(events) -> float:
    """Share of the profiled operators' own time (``key_averages()``) spent in the projections."""
    total = sum(event.self_cpu_time_total for event in events)
    return sum(event.self_cpu_time_total for event in events if event.key in PROJECTION_OPERATORS) / total


def main(argv: list[str] | None = None) -> int:
    from torch.profiler import ProfilerActivity, profile

    from core.hf_classifier import DTYPES, classifier_logits, encode_texts, load_sequence_classifier, load_tokenizer, pad_batch
    from core.synthetic_patents import synthetic_patents
    from core.packed_decoder import PackedGemma2, supports
    from benchmarks.model_flops import classification_flops, matmul_ceiling

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--long-share", type=float, default=0.7)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=1024)
    parser.add_argument("--layouts", default="padded,packed", help="padded: transformers' forward; packed: ours")
    parser.add_argument("--rows", type=int, default=12, help="operators listed per profile")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.model_dir)
    texts = [d.render() for d in synthetic_patents(args.documents, seed=2026, long_share=args.long_share)]
    documents = [item.token_ids for item in encode_texts(tokenizer, texts, args.max_length)]
    lengths = [len(ids) for ids in documents]
    print(f"{len(documents)} patents, {sum(lengths)} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads")
    needed = classification_flops(args.model_dir).of(sum(lengths), len(documents))
    for dtype in args.dtypes.split(","):
        ceiling = matmul_ceiling("cpu", dtype)
        print(f"\n# {dtype}: best matmul {ceiling.tflops:.3f} TFLOP/s ({ceiling.method}, {ceiling.shape})")
        model = load_sequence_classifier(args.model_dir, DTYPES[dtype])
        pad = model.config.pad_token_id
        forwards = {}
        if "padded" in args.layouts:
            forwards["transformers, padded"] = lambda batch: classifier_logits(model, *pad_batch(batch, pad, torch.device("cpu")))
        if "packed" in args.layouts and supports(model.config, args.max_length):
            forwards["packed"] = PackedGemma2(model).logits
        for name, forward in forwards.items():
            for in_flight in (1, 8):
                plan = batches_in_flight(lengths, in_flight, args.max_batch_tokens)
                batches = [[documents[index] for index in indices] for indices in plan]
                computed = sum(max(map(len, b)) * len(b) for b in batches) if "packed" not in name else sum(lengths)

                def run() -> None:
                    with torch.inference_mode():
                        for batch in batches:
                            forward(batch)

                run()  # warm-up: first-call allocations and oneDNN's kernel choices
                started = time.perf_counter()
                run()
                seconds = time.perf_counter() - started
                with profile(activities=[ProfilerActivity.CPU]) as profiled:
                    run()
                events = profiled.key_averages()
                share = projection_share(events)
                mfu = needed / seconds / (ceiling.tflops * 1e12)
                print(f"\n## {dtype}, {name}, {in_flight} in flight: {len(batches)} forward passes, "
                      f"{len(documents) / seconds:.2f} samples/s, padding waste {1 - sum(lengths) / computed:.1%}")
                print(f"MFU {mfu:.1%}; the projections took {share:.1%} of the profiled time, so MFU's ceiling "
                      f"for this forward (nothing else taking any time) is {mfu / share:.1%}")
                print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=36))
                sys.stdout.flush()
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
