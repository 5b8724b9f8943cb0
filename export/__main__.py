"""python -m export: build demo models, export a models file, merge a LoRA adapter with proof, verify.

    python -m export demo-models --out build/demo [--model all|gemma2|llama|kcbert|koelectra]
    python -m export models --models-file models.yaml --repository model_repository [--only NAME ...]
    python -m export merge --base BASE_DIR --adapter ADAPTER_DIR --labels export/labels/kscst.tsv \\
        --name kscst-gemma2 --repository model_repository [--dtype float32|bfloat16] [--engine torch|vllm]
    python -m export verify --base BASE_DIR --adapter ADAPTER_DIR --merged model_repository/kscst-gemma2/1/model
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

from core.command_line import HelpFormatter


def _demo_models(args: argparse.Namespace) -> None:
    from export.demo_models import DEMO_BUILDERS

    for name in DEMO_BUILDERS if args.model == "all" else [args.model]:
        paths = DEMO_BUILDERS[name](args.out, seed=args.seed)
        print(f"{name}: model {paths.base}" + (f", LoRA adapter {paths.adapter}" if paths.adapter else " (full fine-tune)"))


def _models(args: argparse.Namespace) -> None:
    import logging

    from core.models_file import ModelsFile
    from export.models_file_export import export_models

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    models = ModelsFile.read(args.models_file)
    reports = export_models(models, args.repository, only=args.only, device=args.device)
    print(json.dumps({name: asdict(report) for name, report in reports.items()}, indent=2))
    print(f"{len(reports)} models exported and proven in {time.perf_counter() - started:.1f} s into {args.repository}", file=sys.stderr)


def _merge(args: argparse.Namespace) -> None:
    from core.labels import LabelSet
    from core.serving_config import ServingConfig
    from export.merged_model_export import merge_lora
    from export.model_support import check_servable
    from export.triton_package import MERGED_MODEL_FOLDER, merged_model_dir, write_triton_model

    # Validate the serving parameters before spending minutes on a merge.
    serving = ServingConfig(
        engine=args.engine,
        vllm_kv_cache_mib=args.vllm_kv_cache_mib,
        model_dir=Path(MERGED_MODEL_FOLDER),
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        max_queue_tokens=args.max_queue_tokens,
        batching=args.batching,
        device=args.serve_device,
        dtype=args.serve_dtype,
    )
    check_servable(args.base, args.max_length, args.adapter)
    started = time.perf_counter()
    out_dir = merged_model_dir(args.repository, args.name)
    report = merge_lora(
        args.base,
        args.adapter,
        LabelSet.read_tsv(args.labels),
        out_dir,
        dtype=args.dtype,
        max_length=args.max_length,
        proof_documents=args.proof_documents,
        device=args.device,
    )
    folder = write_triton_model(args.repository, args.name, serving)
    print(json.dumps(asdict(report), indent=2))
    print(f"merge proven and exported in {time.perf_counter() - started:.1f} s: {folder}", file=sys.stderr)


def _verify(args: argparse.Namespace) -> None:
    from export.merged_model_export import verify_saved_merge

    tolerance = {} if args.tolerance is None else {"tolerance": args.tolerance}
    comparison = verify_saved_merge(args.base, args.adapter, args.merged, proof_documents=args.proof_documents, **tolerance)
    print(json.dumps(asdict(comparison), indent=2))


def _demo_labelled_set(args: argparse.Namespace) -> None:
    from collections import Counter

    from export.demo_labelled_set import write_demo_labelled_set

    rows = write_demo_labelled_set(args.model_dir, args.out, count=args.count, seed=args.seed)
    sources = Counter(row.source for row in rows)
    print(f"{len(rows)} labelled patents in {args.out}; label sources: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))


def main(argv: list[str] | None = None) -> int:
    # torch and transformers load with the command that needs them, not for --help.
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-models", help="build a tiny base classifier, its LoRA adapter and tokenizer", formatter_class=HelpFormatter)
    demo.add_argument("--out", type=Path, default=Path("build/demo"), help="folder the demo models are written into")
    demo.add_argument(
        "--model", choices=["all", "gemma2", "llama", "kcbert", "koelectra"], default="all",
        help="gemma2: Gemma-2 + LoRA over the 188 KSCST classes; llama: Llama + LoRA over 9 IPC classes; "
        "kcbert: BERT over 9 IPC classes; koelectra: ELECTRA over 3 sentiment classes",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    demo.set_defaults(run=_demo_models)

    from_file = commands.add_parser("models", help="export every model a models file lists into one Triton repository", formatter_class=HelpFormatter)
    from_file.add_argument("--models-file", type=Path, default=Path("models.yaml"), help="the models file (core/models_file.py)")
    from_file.add_argument("--repository", type=Path, default=Path("model_repository"), help="the Triton model repository to write")
    from_file.add_argument("--only", nargs="+", metavar="NAME", help="export only these models (the others are left as they are)")
    from_file.add_argument("--device", default="cpu", help="device for the merges and their proofs (cpu, cuda)")
    from_file.set_defaults(run=_models)

    merge = commands.add_parser("merge", help="merge a LoRA adapter, prove it, write the Triton model", formatter_class=HelpFormatter)
    merge.add_argument("--base", type=Path, required=True, help="base model folder (e.g. google/gemma-2-9b, downloaded)")
    merge.add_argument("--adapter", type=Path, required=True, help="PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("--labels", type=Path, required=True, help="TSV with columns code, name[, placeholder]")
    merge.add_argument("--name", required=True, help="Triton model name")
    merge.add_argument("--repository", type=Path, default=Path("model_repository"), help="the Triton model repository to write")
    merge.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights")
    merge.add_argument("--max-length", type=int, default=512, help="tokens per document; longer input is truncated")
    merge.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens one forward pass may take")
    merge.add_argument("--max-batch-size", type=int, default=64, help="documents one forward pass may take")
    merge.add_argument("--max-queue-tokens", type=int, default=262144, help="queued tokens before requests are refused as overloaded")
    merge.add_argument(
        "--batching", choices=["engine", "triton_dynamic", "none"], default="engine",
        help="engine: continuous token-budget batching (production); the others are baselines to measure it against",
    )
    merge.add_argument("--proof-documents", type=int, default=16, help="generated patents the merge proof compares logits on")
    merge.add_argument("--device", default="cpu", help="device for the merge and its proof (cpu, cuda)")
    merge.add_argument(
        "--engine", choices=["torch", "vllm"], default="torch",
        help="engine the Triton model runs: torch (ours) or vllm (vLLM's async engine, pooling runner)",
    )
    merge.add_argument(
        "--vllm-kv-cache-mib", type=int, default=1024,
        help="vllm engine: KV cache memory in MiB (Gemma-2-9b in bf16 takes ~0.33 MiB per token)",
    )
    merge.add_argument("--serve-device", choices=["auto", "cpu", "cuda"], default="auto", help="device the server runs the model on")
    merge.add_argument(
        "--serve-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
        help="dtype the server computes in (auto: bfloat16 on GPU, float32 on CPU)",
    )
    merge.set_defaults(run=_merge)

    verify = commands.add_parser("verify", help="re-run the merge proof against a merged folder on disk", formatter_class=HelpFormatter)
    verify.add_argument("--base", type=Path, required=True, help="base model folder the adapter was trained on")
    verify.add_argument("--adapter", type=Path, required=True, help="PEFT adapter folder")
    verify.add_argument("--merged", type=Path, required=True, help="the merged model folder to check")
    verify.add_argument(
        "--tolerance", type=float, default=None,
        help="largest max |Δlogit| the proof accepts (default: the export's own, MERGE_TOLERANCE in export/merged_model_export.py)",
    )
    verify.add_argument("--proof-documents", type=int, default=16, help="generated patents the proof compares logits on")
    verify.set_defaults(run=_verify)

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
    from export.merged_model_export import MergeProofFailed
    from export.model_support import UnsupportedModel

    try:
        args.run(args)
    except MergeProofFailed as exc:
        print(f"merge proof FAILED: {exc}", file=sys.stderr)
        return 1
    except (UnsupportedModel, ModelsFileError) as exc:
        print(f"cannot export: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
