"""Tensor codec: property-based round trips over every wire dtype, and validation."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from vlm import codec
from vlm.common.v1 import tensor_pb2
from vlm.errors import InvalidArgument

DTYPES = list(codec.SUPPORTED_DTYPES)

shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4)


def _random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 1e3
        return t.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_round_trip_all_dtypes(dtype: torch.dtype, shape: list[int], seed: int) -> None:
    t = _random_tensor(dtype, shape, seed)
    msg = codec.encode(t)
    assert list(msg.shape) == shape
    assert len(msg.data) == math.prod(shape) * t.element_size()
    # Through the wire bytes, as a receiver sees them.
    back = codec.decode(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype
    assert back.shape == t.shape
    assert torch.equal(back, t)


@settings(max_examples=50, deadline=None)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 1000))
def test_non_contiguous_and_0d(dtype: torch.dtype, seed: int) -> None:
    base = _random_tensor(dtype, [4, 6], seed)
    for t in (base.t(), base[:, ::2], base[1, 2]):
        back = codec.decode(codec.encode(t))
        assert back.shape == t.shape and torch.equal(back, t)


def test_bfloat16_bits_preserved() -> None:
    t = torch.tensor([1.5, -0.0, float("inf"), 3.140625], dtype=torch.bfloat16)
    msg = codec.encode(t)
    assert msg.dtype == tensor_pb2.DTYPE_BFLOAT16
    assert msg.data == t.view(torch.int16).numpy().tobytes()
    assert torch.equal(codec.decode(msg).view(torch.int16), t.view(torch.int16))


def test_little_endian_layout() -> None:
    msg = codec.encode(torch.tensor([1, 256], dtype=torch.int32))
    assert msg.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_decode_is_zero_copy() -> None:
    buf = bytearray(codec.encode(torch.arange(16, dtype=torch.int32)).data)
    t = codec.from_buffer(buf, torch.int32, (4, 4))
    buf[0] = 7  # the tensor views the buffer: no copy was made
    assert int(t[0, 0]) == 7


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "t.dtype"),
        (tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "t.dtype"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2], data=b"\0" * 4), "t.data"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], data=b"\0" * 8), "t.data"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1], data=b""), "t.shape"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[1] * 9, data=b"\0"), "t.shape"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[1 << 20, 1 << 20], data=b""), "t.shape"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[2], data=b"\x01\x02"), "t.data"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[], data=b""), "t.data"),
    ],
)
def test_decode_rejects_malformed(msg: tensor_pb2.Tensor, field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        codec.decode(msg, field="t")
    assert exc.value.field == field


def test_empty_tensor() -> None:
    msg = codec.encode(torch.empty(0, 3, dtype=torch.float16))
    assert msg.data == b""
    back = codec.decode(msg)
    assert back.shape == (0, 3) and back.dtype == torch.float16
