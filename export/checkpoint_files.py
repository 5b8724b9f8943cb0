"""A model folder's weights read and written one tensor (or one block of rows) at a time.

The export of a 9B model must not hold a shard, let alone the model, in memory. safetensors'
own API does not allow that: ``safe_open`` maps the whole file, so every page read stays in
the process's resident memory until the file is closed (safetensors issue #542), and
``save_file`` takes every tensor of a file at once (issues #291, #458). The format itself is
simple (8-byte little-endian header length, a JSON header of dtype, shape and byte offsets,
then the tensors' bytes), so ``SafetensorsShard`` reads byte ranges with plain file reads and
``SafetensorsWriter`` writes the header first, from the shapes known beforehand, then the
tensors in order. Files written here are read back by safetensors itself in the tests.

``CheckpointFolder`` is a folder's weights as transformers saves them: ``model.safetensors``,
or shards with ``model.safetensors.index.json``; older ``pytorch_model.bin`` checkpoints are read
through ``torch.load(mmap=True)`` (lazily too, but their mapped pages do count as resident).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"

# The dtypes model checkpoints use; safetensors names them so in its header.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Rows copied per read when a big tensor (a 256,000-token embedding) is cast or copied.
COPY_BLOCK_BYTES = 64 * 2**20


class CheckpointError(ValueError):
    """A weights file cannot be read as a checkpoint; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


class SafetensorsShard:
    """One ``.safetensors`` file: its header, and tensors or row ranges read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            try:
                header = json.loads(file.read(header_size))
            except ValueError as exc:
                raise CheckpointError(f"{self.path}: not a safetensors file ({exc})") from None
        self.data_start = 8 + header_size
        self.metadata = header.pop("__metadata__", None) or {}
        self.specs: dict[str, TensorSpec] = {}
        self._offsets: dict[str, int] = {}
        for name, entry in header.items():
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which the export does not read")
            self.specs[name] = TensorSpec(SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
            self._offsets[name] = self.data_start + entry["data_offsets"][0]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor, or the rows ``rows`` (a step-1 slice of its first dimension)."""
        spec = self.specs[name]
        if spec.shape and rows is not None:
            start, stop, _ = rows.indices(spec.shape[0])
            shape, offset, size = (max(stop - start, 0), *spec.shape[1:]), start * spec.row_bytes, max(stop - start, 0) * spec.row_bytes
        else:
            shape, offset, size = spec.shape, 0, spec.nbytes
        buffer = torch.empty(size, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as file:
            file.seek(self._offsets[name] + offset)
            view = memoryview(buffer.numpy())
            while view:
                count = file.readinto(view)
                if not count:
                    raise CheckpointError(f"{self.path}: the file ends inside tensor {name}")
                view = view[count:]
        return buffer.view(spec.dtype).reshape(shape)


class TorchBinShard:
    """One ``pytorch_model*.bin`` file, memory-mapped (``torch.load(mmap=True)``), weights only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tensors = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        self.specs = {name: TensorSpec(tensor.dtype, tuple(tensor.shape)) for name, tensor in self._tensors.items()}

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        tensor = self._tensors[name]
        return (tensor if rows is None else tensor[rows]).clone()


class CheckpointFolder:
    """The weights of a Hugging Face model folder, in its shards' order, read a tensor at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index_file: str | None = None
        if (self.folder / SAFETENSORS_INDEX).exists():
            self.index_file = SAFETENSORS_INDEX
        elif (self.folder / TORCH_INDEX).exists():
            self.index_file = TORCH_INDEX
        if self.index_file is not None:
            weight_map = json.loads((self.folder / self.index_file).read_text(encoding="utf-8"))["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        elif (self.folder / SAFETENSORS_SINGLE).exists():
            files = [SAFETENSORS_SINGLE]
        elif (self.folder / TORCH_SINGLE).exists():
            files = [TORCH_SINGLE]
        else:
            raise CheckpointError(f"{self.folder}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {TORCH_SINGLE}")
        self.shards = {
            name: SafetensorsShard(self.folder / name) if name.endswith(".safetensors") else TorchBinShard(self.folder / name)
            for name in files
        }
        self._shard_of = {key: name for name, shard in self.shards.items() for key in shard.specs}

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    def shard_of(self, key: str) -> str:
        return self._shard_of[key]

    def spec(self, key: str) -> TensorSpec:
        return self.shards[self._shard_of[key]].specs[key]

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        return self.shards[self._shard_of[key]].read(key, rows)

    def read_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """``tensor[rows]`` for sorted unique row indices, reading only those rows (runs of
        consecutive rows in one read)."""
        runs = torch.tensor_split(rows, (torch.nonzero(rows.diff() != 1).flatten() + 1).tolist())
        return torch.cat([self.read(key, slice(int(run[0]), int(run[-1]) + 1)) for run in runs if len(run)])

    def blocks(self, key: str) -> Iterator[torch.Tensor]:
        """The tensor in blocks of whole rows of at most about ``COPY_BLOCK_BYTES``."""
        spec = self.spec(key)
        if not spec.shape or spec.nbytes <= COPY_BLOCK_BYTES:
            yield self.read(key)
            return
        step = max(1, COPY_BLOCK_BYTES // max(spec.row_bytes, 1))
        for start in range(0, spec.shape[0], step):
            yield self.read(key, slice(start, min(start + step, spec.shape[0])))


class SafetensorsWriter:
    """Writes one ``.safetensors`` file whose tensors are declared up front and then written in
    that order, each in one piece or in blocks of whole rows."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = list(specs)
        self._specs = specs
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, spec in specs.items():
            header[name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned, as safetensors writes them
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._position = 0  # index into _order of the tensor being written
        self._written = 0  # bytes of it written so far

    def write(self, name: str, block: torch.Tensor) -> None:
        if self._position >= len(self._order) or name != self._order[self._position]:
            expected = self._order[self._position] if self._position < len(self._order) else "nothing more"
            raise CheckpointError(f"{self.path}: wrote {name} where {expected} comes next")
        spec = self._specs[name]
        if block.dtype != spec.dtype:
            raise CheckpointError(f"{self.path}: {name} is declared {spec.dtype}, written as {block.dtype}")
        data = block.contiguous().reshape(-1).view(torch.uint8).numpy() if block.numel() else b""
        self._file.write(data)
        self._written += block.numel() * block.element_size()
        if self._written > spec.nbytes:
            raise CheckpointError(f"{self.path}: more bytes written for {name} than its shape {spec.shape} holds")
        if self._written == spec.nbytes:
            self._position, self._written = self._position + 1, 0

    def close(self) -> None:
        self._file.flush()
        self._file.close()
        if self._position != len(self._order):
            raise CheckpointError(f"{self.path}: closed before {self._order[self._position]} was written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()
