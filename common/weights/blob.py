"""The bytes the weight transports ship: a safetensors blob, its per-chunk checksum table and the manifest digest.

- :func:`serialize` writes a state dict as a safetensors blob into one fresh buffer and checksums every
  ``chunk_size`` piece right after writing it, while it is still in cache: one copy, one checksum pass, in two threads
  (each its own chunks; numpy's copy and xxhash release the GIL). For the dtypes in :data:`DTYPES` the bytes equal
  ``safetensors.torch.save``'s (same header, same tensor order; a unit test holds it); any other dtype falls back to
  ``safetensors.torch.save`` and a separate checksum pass.
- **Checksums.** XXH3-64 (``xxhash``, a declared dependency) per chunk: ~25 GB/s here against ~4 GB/s for
  ``zlib.crc32`` and ~1.7 GB/s for sha256 (docs/WEIGHTS.md has the measurements that chose it). A corrupted or
  truncated chunk passes with probability ~2^-64. It is not a defence against an attacker who can rewrite frames:
  CURVE (``security.curve``) is, it authenticates and encrypts every frame.
- **Manifest digest** = sha256 of (blob size, chunk size, the checksum table): what the stream transport announces
  as ``WeightsInfo.sha256``. An actor recomputes it from the table the server sends, so the table is bound to the
  broker's announcement, and every chunk to the table: an end-to-end check without a sha256 pass over the payload.
- :func:`tensors_from_buffer` parses a blob into zero-copy tensor views after bounds-checking every header entry, so
  a malformed blob raises :class:`BlobError` (a ValueError) instead of reading out of bounds. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
from typing import Any

import numpy as np
import torch
import xxhash
from safetensors.torch import save as safetensors_save

__all__ = [
    "DTYPES",
    "BlobError",
    "blob_size",
    "checksum_table",
    "chunk_checksum",
    "manifest_digest",
    "parse_checksum_table",
    "serialize",
    "tensors_from_buffer",
]

# safetensors dtype code → torch dtype, in safetensors' own order (ascending): it writes tensors by dtype descending,
# then by name, and so do we.
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
}  # fmt: skip
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_RANK = {code: i for i, code in enumerate(DTYPES)}
_MANIFEST_TAG = b"editrl-weights-stream-2\0"
_ENTRY_BYTES = 8  # one table entry: the chunk's XXH3-64 as a big-endian uint64


class BlobError(ValueError):
    """A blob or its checksum table is malformed."""


def chunk_checksum(data: Any) -> int:
    """XXH3-64 (seed 0) of one chunk: any contiguous buffer (bytes, memoryview, uint8 numpy array, ZeroMQ frame)."""
    return xxhash.xxh3_64_intdigest(data)


def checksum_table(checksums: tuple[int, ...] | list[int]) -> bytes:
    """Every chunk's checksum as ``n_chunks`` big-endian uint64 (the stream meta reply's second frame)."""
    return struct.pack(f">{len(checksums)}Q", *checksums)


def parse_checksum_table(raw: Any, n_chunks: int) -> tuple[int, ...]:
    """Inverse of :func:`checksum_table`. Raises BlobError unless ``raw`` holds exactly ``n_chunks`` entries."""
    if len(raw) != _ENTRY_BYTES * n_chunks:
        raise BlobError(f"checksum table of {len(raw)} bytes for {n_chunks} chunks")
    return struct.unpack(f">{n_chunks}Q", raw)


def manifest_digest(size: int, chunk_size: int, table: Any) -> str:
    """sha256 hex of (blob size, chunk size, checksum table): the stream transport's announced digest."""
    h = hashlib.sha256(_MANIFEST_TAG)
    h.update(size.to_bytes(8, "big") + chunk_size.to_bytes(8, "big"))
    h.update(table)
    return h.hexdigest()


def _layout(state_dict: dict[str, torch.Tensor]) -> tuple[bytes, list[torch.Tensor]] | None:
    """The blob's first bytes (u64 header length + JSON header padded with spaces to a multiple of 8, as
    safetensors writes it) and the tensors in blob order; None when a dtype is not in DTYPES."""
    items = []
    for name, tensor in state_dict.items():
        code = _CODES.get(tensor.dtype)
        if code is None:
            return None
        items.append((name, code, tensor.detach().cpu().contiguous()))
    items.sort(key=lambda item: (-_RANK[item[1]], item[0]))
    header: dict[str, Any] = {}
    pos = 0
    for name, code, tensor in items:
        end = pos + tensor.numel() * tensor.element_size()
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [pos, end]}
        pos = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, [tensor for *_, tensor in items]


def blob_size(state_dict: dict[str, torch.Tensor]) -> int:
    """Bytes of the blob :func:`serialize` would write (no copy of the tensors)."""
    layout = _layout(state_dict)
    if layout is None:
        return len(_safetensors_bytes(state_dict))
    head, tensors = layout
    return len(head) + sum(t.numel() * t.element_size() for t in tensors)


def _safetensors_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


def serialize(state_dict: dict[str, torch.Tensor], chunk_size: int, threads: int = 2) -> tuple[Any, tuple[int, ...]]:
    """The blob (a uint8 numpy array, or bytes for a dtype outside DTYPES) and the checksum of each chunk."""
    layout = _layout(state_dict)
    if layout is None:
        data = _safetensors_bytes(state_dict)
        view = memoryview(data)
        return data, tuple(chunk_checksum(view[i : i + chunk_size]) for i in range(0, len(view), chunk_size))
    head, tensors = layout
    segments = [np.frombuffer(head, dtype=np.uint8)]
    segments += [t.reshape(-1).view(torch.uint8).numpy() for t in tensors if t.numel() > 0]
    total = sum(len(s) for s in segments)
    pieces: list[list[tuple[int, np.ndarray, int, int]]] = [[] for _ in range(math.ceil(total / chunk_size))]
    pos = 0
    for seg in segments:  # cut every segment at chunk boundaries: (blob offset, source, source offset, length)
        off = 0
        while off < len(seg):
            k = pos // chunk_size
            n = min(len(seg) - off, (k + 1) * chunk_size - pos)
            pieces[k].append((pos, seg, off, n))
            pos, off = pos + n, off + n
    out = np.empty(total, dtype=np.uint8)  # not zero-filled: every byte is written below
    checksums = [0] * len(pieces)
    errors: list[BaseException] = []

    def fill(indices: range) -> None:
        try:
            for k in indices:
                for at, seg, off, n in pieces[k]:
                    out[at : at + n] = seg[off : off + n]
                checksums[k] = chunk_checksum(out[k * chunk_size : (k + 1) * chunk_size])
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=fill, args=(range(i, len(pieces), threads),)) for i in range(1, threads)]
    for worker in workers:
        worker.start()
    fill(range(0, len(pieces), max(1, threads)))
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return out, tuple(checksums)


def tensors_from_buffer(buf: Any) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob as zero-copy views of ``buf`` (a writable buffer: bytearray, uint8 numpy
    array). The format is a little-endian u64 header length, a JSON header (name -> dtype, shape, data_offsets) and
    the raw data; every entry is checked against the buffer before a view is made. Raises BlobError.
    """
    view = memoryview(buf).cast("B")
    if len(view) < 8:
        raise BlobError("safetensors blob shorter than its header length")
    n = int.from_bytes(view[:8], "little")
    if not 2 <= n <= len(view) - 8:
        raise BlobError(f"safetensors header length {n} does not fit a {len(view)}-byte blob")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except ValueError as exc:
        raise BlobError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BlobError("safetensors header is not a map")
    start, size = 8 + n, len(view) - 8 - n
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = DTYPES[entry["dtype"]], list(entry["shape"]), entry["data_offsets"]
            count = math.prod(shape)
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(b, int) and isinstance(e, int)
        except (KeyError, TypeError, ValueError):
            raise BlobError(f"safetensors entry {name!r} is malformed") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not ok or not 0 <= b <= e <= size or e - b != count * itemsize:
            raise BlobError(f"safetensors entry {name!r}: offsets {b}..{e} do not hold {shape} {dtype}")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(view, dtype=dtype, count=count, offset=start + b).reshape(shape)
    return out
