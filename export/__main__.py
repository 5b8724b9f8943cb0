"""python -m export: build demo models, export the models of a models file (LoRA merged, proven), verify.

    python -m export demo-models --out build/demo [--model all|gemma2|llama|kcbert|koelectra|gemma2-bench]
    python -m export models --models-file models.yaml --repository model_repository [--only NAME ...]
    python -m export verify --models-file models.yaml --repository model_repository [--only NAME ...]
    python -m export demo-labelled-set --model-dir model_repository/kscst-gemma2/1/model \\
        --out clients/examples/labelled_patents.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from patent_classifier_client.command_line import HelpFormatter


def _demo_models(args: argparse.Namespace) -> None:
    from export.demo_models import BENCH_BUILDERS, DEMO_BUILDERS

    builders = {**DEMO_BUILDERS, **BENCH_BUILDERS}
    for name in DEMO_BUILDERS if args.model == "all" else [args.model]:
        paths = builders[name](args.out, seed=args.seed)
        print(f"{name}: model {paths.base}" + (f", LoRA adapter {paths.adapter}" if paths.adapter else " (full fine-tune)"))


def _models(args: argparse.Namespace) -> None:
    import logging

    from core.models_file import ModelsFile
    from export.models_file_export import export_models

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    models = ModelsFile.read(args.models_file)
    reports = export_models(models, args.repository, only=args.only, device=args.device, **_proof_memory(args))
    print(json.dumps({name: asdict(report) for name, report in reports.items()}, indent=2))
    print(f"{len(reports)} models exported and proven in {time.perf_counter() - started:.1f} s into {args.repository}", file=sys.stderr)


def _verify(args: argparse.Namespace) -> None:
    from core.models_file import ModelsFile
    from export.merged_model_export import MERGE_TOLERANCE, verify_export
    from export.triton_package import merged_model_dir

    models = ModelsFile.read(args.models_file)
    for name in args.only or models.names:
        comparison = verify_export(
            models.model(name), merged_model_dir(args.repository, name), device=args.device,
            tolerance=MERGE_TOLERANCE if args.tolerance is None else args.tolerance, **_proof_memory(args),
        )
        print(json.dumps({name: asdict(comparison)}, indent=2))


def _demo_labelled_set(args: argparse.Namespace) -> None:
    from collections import Counter

    from export.demo_labelled_set import write_demo_labelled_set

    rows = write_demo_labelled_set(args.model_dir, args.out, count=args.count, seed=args.seed)
    sources = Counter(row.source for row in rows)
    print(f"{len(rows)} labelled patents in {args.out}; label sources: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))


def _proof_memory(args: argparse.Namespace) -> dict:
    return {} if args.proof_memory_gib is None else {"proof_memory_gib": args.proof_memory_gib}


def _positive_gib(value: str) -> float:
    gib = float(value)
    if not gib > 0:
        raise argparse.ArgumentTypeError(f"is {value}; it must be more than 0 GiB")
    return gib


def main(argv: list[str] | None = None) -> int:
    # torch and transformers load with the command that needs them, not for --help.
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-models", help="build a tiny base classifier, its LoRA adapter and tokenizer", formatter_class=HelpFormatter)
    demo.add_argument("--out", type=Path, default=Path("build/demo"), help="folder the demo models are written into")
    demo.add_argument(
        "--model", choices=["all", "gemma2", "llama", "kcbert", "koelectra", "gemma2-bench"], default="all",
        help="gemma2: Gemma-2 + LoRA over the 188 KSCST classes; llama: Llama + LoRA over 9 IPC classes; "
        "kcbert: BERT over 9 IPC classes; koelectra: ELECTRA over 3 sentiment classes (all: these four); "
        "gemma2-bench: a Gemma-2 of Gemma-2-9b's proportions at 95 M parameters, for `make bench`",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    demo.set_defaults(run=_demo_models)

    from_file = commands.add_parser("models", help="export every model a models file lists into one Triton repository", formatter_class=HelpFormatter)
    from_file.add_argument("--models-file", type=Path, default=Path("models.yaml"), help="the models file (core/models_file.py)")
    from_file.add_argument("--repository", type=Path, default=Path("model_repository"), help="the Triton model repository to write")
    from_file.add_argument("--only", nargs="+", metavar="NAME", help="export only these models (the others are left as they are)")
    from_file.set_defaults(run=_models)

    verify = commands.add_parser("verify", help="re-run the proof of exported models against their folders on disk", formatter_class=HelpFormatter)
    verify.add_argument("--models-file", type=Path, default=Path("models.yaml"), help="the models file the models were exported from")
    verify.add_argument("--repository", type=Path, default=Path("model_repository"), help="the Triton model repository they were exported into")
    verify.add_argument("--only", nargs="+", metavar="NAME", help="verify only these models")
    verify.add_argument(
        "--tolerance", type=float, default=None,
        help="largest max |Δlogit| the proof accepts (default: the export's own, MERGE_TOLERANCE in export/merged_model_export.py)",
    )
    verify.set_defaults(run=_verify)

    for command in (from_file, verify):
        command.add_argument("--device", default="cpu", help="device for the proofs (cpu, cuda)")
        command.add_argument(
            "--proof-memory-gib", type=_positive_gib, default=None,
            help="memory for the proof's float32 weights; a bigger model is proven layer by layer "
            "(default: the export's own, DEFAULT_PROOF_MEMORY_GIB in export/merged_model_export.py)",
        )

    labelled = commands.add_parser(
        "demo-labelled-set", formatter_class=HelpFormatter,
        help="generate the labelled patents `make eval` measures the demo model on (see export/demo_labelled_set.py)",
    )
    labelled.add_argument("--model-dir", type=Path, required=True, help="the merged demo model folder")
    labelled.add_argument("--out", type=Path, default=Path("clients/examples/labelled_patents.jsonl"), help="JSON-lines file to write")
    labelled.add_argument("--count", type=int, default=120, help="labelled patents to generate")
    labelled.add_argument("--seed", type=int, default=2026, help="seed of the patents and of the label noise")
    labelled.set_defaults(run=_demo_labelled_set)

    args = parser.parse_args(argv)
    from core.models_file import ModelsFileError
    from export.checkpoint_files import CheckpointError
    from export.merged_model_export import MergeProofFailed
    from export.model_support import UnsupportedModel
    from export.precision_agreement import PrecisionRefused
    from export.repository_staging import StagingError

    try:
        args.run(args)
    except MergeProofFailed as exc:
        print(f"merge proof FAILED: {exc}", file=sys.stderr)
        return 1
    except PrecisionRefused as exc:
        print(f"served precision REFUSED: {exc}", file=sys.stderr)
        return 1
    except (UnsupportedModel, ModelsFileError, CheckpointError, StagingError) as exc:
        print(f"cannot export: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
