"""common/weights/blob.py: the one-pass serializer writes exactly safetensors' bytes with the right per-chunk
checksums, is a snapshot of the tensors, and the checksum table and manifest digest reject what they should."""

from __future__ import annotations

import pytest
import torch
import xxhash
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from editrl.common.weights.blob import (
    DTYPES,
    BlobError,
    blob_size,
    checksum_table,
    manifest_digest,
    parse_checksum_table,
    serialize,
    tensors_from_buffer,
)


def every_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPES.values()):
        x = torch.randn(5, 3 + i, generator=gen) * 100
        out[f"t{i}.{dtype}"] = x > 0 if dtype == torch.bool else x.to(dtype)  # [5, 3 + i]
    out["zero_dim"] = torch.tensor(7, dtype=torch.int64)
    out["empty"] = torch.zeros(0, 4)
    out["strided"] = torch.randn(6, 4, generator=gen).t()  # not contiguous: serialized as its contiguous copy
    out["grad"] = torch.nn.Parameter(torch.randn(3, generator=gen))
    out["naïve name"] = torch.randn(2, generator=gen).to(torch.bfloat16)
    return out


def reference(sd: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.detach().contiguous() for k, v in sd.items()})


def chunk_sums(data: bytes, chunk_size: int) -> tuple[int, ...]:
    return tuple(xxhash.xxh3_64_intdigest(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk_size", [64, 100, 1 << 20])
def test_serialize_writes_safetensors_bytes_and_chunk_checksums(chunk_size, threads):
    sd = every_dtype()
    want = reference(sd)
    data, sums = serialize(sd, chunk_size, threads=threads)
    assert bytes(data) == want and blob_size(sd) == len(want)
    assert sums == chunk_sums(want, chunk_size)
    got = tensors_from_buffer(data)
    for k, v in safetensors_load(want).items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_empty_state_dict_and_dtypes_outside_the_fast_path():
    data, sums = serialize({}, 64)
    assert bytes(data) == safetensors_save({}) and sums == chunk_sums(safetensors_save({}), 64)
    fp8 = {"a": torch.randn(40).to(torch.float8_e4m3fn), "b": torch.randn(3)}  # falls back to safetensors' own writer
    data, sums = serialize(fp8, 64)
    assert bytes(data) == reference(fp8) and sums == chunk_sums(reference(fp8), 64) and blob_size(fp8) == len(data)


def test_the_blob_is_a_snapshot_of_the_tensors():
    """The learner trains on right after publishing: later in-place updates must not reach a published blob."""
    w = torch.zeros(1000)
    data, _ = serialize({"w": w}, 256)
    w.add_(1.0)
    assert torch.equal(tensors_from_buffer(data)["w"], torch.zeros(1000))


def test_checksum_table_round_trip_and_its_length_check():
    sums = (0, 1, 2**64 - 1, 12345678901234567)
    table = checksum_table(sums)
    assert len(table) == 8 * len(sums) and parse_checksum_table(table, len(sums)) == sums
    for bad in (table[:-1], table + b"\0", table[:-8]):
        with pytest.raises(BlobError, match="checksum table"):
            parse_checksum_table(bad, len(sums))


def test_the_manifest_digest_covers_size_chunk_size_and_every_entry():
    table = checksum_table((1, 2, 3))
    digest = manifest_digest(300, 100, table)
    assert len(digest) == 64 and digest == manifest_digest(300, 100, bytearray(table))
    others = {
        manifest_digest(299, 100, table),
        manifest_digest(300, 101, table),
        manifest_digest(300, 100, checksum_table((1, 2, 4))),
        manifest_digest(300, 100, checksum_table((2, 1, 3))),
    }
    assert digest not in others and len(others) == 4
