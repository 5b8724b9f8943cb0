"""The export of a Gemma-2 of the real 9B width on this machine: peak memory, time, proof figures.

For each ``--layers`` count, builds under ``--work`` a Gemma-2 with google/gemma-2-9b's published
configuration (hidden 3584, intermediate 14336, 16 heads × 256, 8 KV heads, vocabulary 256,000,
softcaps 50/30, query_pre_attn_scalar 256, sliding window 4096) but only that many layers, with
random weights saved as the real checkpoint is published: ``Gemma2ForCausalLM`` keys (the tied
``lm_head`` absent), float32, shards of at most 5 GB with ``model.safetensors.index.json``. Beside
it, a rank-16 LoRA adapter on every linear layer (q, k, v, o, gate, up, down) with the ``score``
head in ``modules_to_save``, as a PEFT sequence-classification fine-tune saves it. Then runs the
export a user runs, ``python -m export models`` on a one-entry models file, under GNU time
(``/usr/bin/time -v``), and reads its peak resident memory, its wall time and its merge report.

Each figure is modelled as fixed part + per-layer part × layers; two layer counts give both
parts, and the model is evaluated at 42 layers, google/gemma-2-9b's. The files are written and
read through this machine's page cache, which holds a few layers but not a 37 GB model: the real
export reads from disk, so the extrapolated time is a floor on a slower disk.

    python -m benchmarks.real_width_export --work build/real-width-export [--layers 2 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import Gemma2Config

from export.checkpoint_files import SAFETENSORS_INDEX, SafetensorsWriter, TensorSpec
from export.classifier_layout import empty_classifier
from export.demo_models import GEMMA_TOKENS, KSCST_LABELS_FILE, train_patent_tokenizer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REAL_LAYERS = 42
SHARD_BYTES = 5 * 10**9  # the "5GB" max_shard_size google/gemma-2-9b was saved with
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_NAME = "kscst-gemma2"


def gemma2_9b_config(layers: int) -> Gemma2Config:
    """google/gemma-2-9b's config.json, but ``layers`` layers."""
    return Gemma2Config(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192, rms_norm_eps=1e-6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        query_pre_attn_scalar=256, sliding_window=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        architectures=["Gemma2ForCausalLM"], dtype="float32",
    )


def _random_blocks(shape: tuple[int, ...], std: float, generator: torch.Generator):
    rows = max(1, 2**24 // max(1, int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else 1))
    for start in range(0, shape[0], rows):
        yield torch.randn((min(rows, shape[0] - start), *shape[1:]), generator=generator) * std


def write_base(folder: Path, layers: int, seed: int = 0) -> None:
    config = gemma2_9b_config(layers)
    # The backbone's names and shapes, from the real class (a causal LM saves the same model.* keys).
    backbone = {name: tuple(p.shape) for name, p in empty_classifier(config).named_parameters() if name.startswith("model.")}
    shards, current, size = [], [], 0
    for name, shape in backbone.items():
        nbytes = 4 * int(torch.tensor(shape).prod().item())
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(folder / file, {n: TensorSpec(torch.float32, backbone[n]) for n in names}) as writer:
            for name in names:
                for block in _random_blocks(backbone[name], 0.02, generator):
                    writer.write(name, block)
                weight_map[name] = file
    total = sum(4 * int(torch.tensor(shape).prod().item()) for shape in backbone.values())
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    train_patent_tokenizer(tokens=GEMMA_TOKENS).save_pretrained(folder)


def write_adapter(folder: Path, base: Path, layers: int, labels: int, seed: int = 1) -> None:
    from peft import LoraConfig

    config = gemma2_9b_config(layers)
    model = empty_classifier(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in LORA_TARGETS:
            bound = module.in_features**-0.5  # PEFT's initialisation of A; B trained away from zero
            tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.rand((LORA_RANK, module.in_features), generator=generator) * 2 - 1) * bound
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn((module.out_features, LORA_RANK), generator=generator) * 0.02
    tensors["base_model.model.score.weight"] = torch.randn((labels, config.hidden_size), generator=generator) * 0.02
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(
        task_type="SEQ_CLS", r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS),
        modules_to_save=["score"], base_model_name_or_path=str(base),
    ).save_pretrained(folder)


def _gnu_time(output: str) -> dict:
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", output)
    seconds = sum(float(part) * 60**power for power, part in enumerate(reversed(wall.group(1).split(":"))))
    return {"peak_rss_gib": int(rss.group(1)) * 1024 / 2**30, "wall_seconds": seconds}


def run_export(work: Path, layers: int, proof_memory_gib: float, weights_dtype: str) -> dict:
    folder = (work / f"layers-{layers}").resolve()  # the models file resolves relative paths from its own folder
    shutil.rmtree(folder, ignore_errors=True)
    labels = len(KSCST_LABELS_FILE.read_text(encoding="utf-8").splitlines()) - 1
    write_base(folder / "base", layers)
    write_adapter(folder / "adapter", folder / "base", layers, labels)
    models_file = folder / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": [{
        "name": MODEL_NAME, "base": str(folder / "base"), "adapter": str(folder / "adapter"),
        "labels": str(KSCST_LABELS_FILE), "weights_dtype": weights_dtype, "serving": {"max_length": 512},
    }]}))
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "export", "models", "--models-file", str(models_file),
               "--repository", str(folder / "model_repository"), "--proof-memory-gib", str(proof_memory_gib)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the export of {layers} layers failed:\n{result.stderr[-4000:]}")
    report = json.loads((folder / "model_repository" / MODEL_NAME / "1" / "model" / "merge_report.json").read_text())
    base_bytes = sum(path.stat().st_size for path in (folder / "base").glob("*.safetensors"))
    shutil.rmtree(folder)  # tens of GB: one layer count on disk at a time
    return {"layers": layers, "base_gib": base_bytes / 2**30, **_gnu_time(result.stderr), **{
        key: report[key] for key in ("write_seconds", "proof_seconds", "proof", "merged_weights")
    }, "merged_in_float32": report["merged_in_float32"], "saved_model": report["saved_model"]}


def extrapolate(runs: list[dict], key: str, layers: int = REAL_LAYERS) -> tuple[float, float, float]:
    """(fixed, per layer, value at ``layers``) of a figure linear in the layer count."""
    low, high = runs[0], runs[-1]
    per_layer = (high[key] - low[key]) / (high["layers"] - low["layers"])
    fixed = low[key] - per_layer * low["layers"]
    return fixed, per_layer, fixed + per_layer * layers


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    return f"{model}, {len(os.sched_getaffinity(0))} usable cores, {memory:.1f} GiB RAM, {platform.platform()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/real-width-export"))
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 4], metavar=("FEW", "MORE"))
    parser.add_argument("--proof-memory-gib", type=float, default=2.0,
                        help="below the float32 size of even the few-layer model, so its proof runs layer by layer as the real 9B's does")
    parser.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = parser.parse_args(argv)
    runs = [run_export(args.work, layers, args.proof_memory_gib, args.weights_dtype) for layers in sorted(args.layers)]
    print(f"machine: {machine()}")
    print(json.dumps(runs, indent=2))
    counts = " | ".join(f"{run['layers']} layers" for run in runs)
    print(f"\n| figure | {counts} | fixed | per layer | {REAL_LAYERS} layers (fixed + per layer × {REAL_LAYERS}) |")
    print("|---|" + "---:|" * (len(runs) + 3))
    for key, unit in (("base_gib", "GiB"), ("peak_rss_gib", "GiB"), ("wall_seconds", "s"), ("write_seconds", "s"), ("proof_seconds", "s")):
        fixed, per_layer, real = extrapolate(runs, key)
        values = " | ".join(f"{run[key]:.2f}" for run in runs)
        print(f"| {key} ({unit}) | {values} | {fixed:.2f} | {per_layer:.3f} | {real:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
