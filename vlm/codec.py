"""Tensor ⇄ `vlm.common.v1.Tensor` codec.

Encoding writes the raw little-endian C-contiguous bytes. Decoding is zero-copy: the returned
tensor is a view over the message's bytes (`torch.frombuffer`), so it must be treated as
read-only; call `.clone()` before writing to it. Every decode is validated first (known dtype,
rank and element limits, exact byte length), so a malformed tensor never reaches a model.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import torch

from vlm.common.v1 import tensor_pb2
from vlm.errors import InvalidArgument

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("the tensor wire format is little-endian; this host is not")

DType = tensor_pb2.DType

_TORCH_BY_WIRE: dict[int, torch.dtype] = {
    DType.DTYPE_FLOAT32: torch.float32,
    DType.DTYPE_FLOAT16: torch.float16,
    DType.DTYPE_BFLOAT16: torch.bfloat16,
    DType.DTYPE_FLOAT64: torch.float64,
    DType.DTYPE_INT64: torch.int64,
    DType.DTYPE_INT32: torch.int32,
    DType.DTYPE_INT16: torch.int16,
    DType.DTYPE_INT8: torch.int8,
    DType.DTYPE_UINT8: torch.uint8,
    DType.DTYPE_BOOL: torch.bool,
}
_WIRE_BY_TORCH: dict[torch.dtype, int] = {v: k for k, v in _TORCH_BY_WIRE.items()}

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_WIRE_BY_TORCH)


@dataclass(frozen=True)
class TensorLimits:
    """Bounds checked before any decode."""

    max_rank: int = 8
    max_elements: int = 1 << 31


DEFAULT_LIMITS = TensorLimits()


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` → "float32"."""
    return str(dtype).removeprefix("torch.")


def encode_wire(tensor: torch.Tensor) -> Pieces:
    """A tensor (any device, any strides) as the pieces of a serialized `Tensor` message: the
    header (dtype, shape) and a view of the raw bytes, so that large tensors are copied once,
    when the caller joins the pieces. The only tensor serialisation (`encode` uses it)."""
    wire = _WIRE_BY_TORCH.get(tensor.dtype)
    if wire is None:
        raise InvalidArgument(f"unsupported tensor dtype {tensor.dtype}")
    t = tensor.detach().to("cpu").contiguous()
    head = tensor_pb2.Tensor(dtype=wire, shape=list(t.shape)).SerializeToString()
    if not t.numel():
        return [head]
    # A flat byte view works for every dtype, bfloat16 included (numpy has no bfloat16).
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    return [head, *length_delimited(_DATA, [data])]


def encode(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Serialize a tensor to a `Tensor` message."""
    return tensor_pb2.Tensor.FromString(b"".join(encode_wire(tensor)))


Pieces = list[bytes | memoryview]


def length_delimited(number: int, pieces: Pieces) -> Pieces:
    """Protobuf field `number` (an embedded message or bytes) holding the concatenation of
    `pieces`, as pieces: tag and length prefixed, nothing copied."""
    size = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in pieces)
    return [_varint(number << 3 | 2) + _varint(size), *pieces]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_DATA = tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number


def decode(
    msg: tensor_pb2.Tensor, *, field: str = "tensor", limits: TensorLimits = DEFAULT_LIMITS
) -> torch.Tensor:
    """Validate and decode without copying. Raises InvalidArgument naming `field`."""
    dtype = _TORCH_BY_WIRE.get(msg.dtype)
    if dtype is None:
        raise InvalidArgument(f"unknown or unspecified dtype {msg.dtype}", field=f"{field}.dtype")
    shape = tuple(msg.shape)
    if len(shape) > limits.max_rank:
        raise InvalidArgument(
            f"rank {len(shape)} exceeds the limit {limits.max_rank}", field=f"{field}.shape"
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"negative dimension in shape {list(shape)}", field=f"{field}.shape")
    numel = math.prod(shape)
    if numel > limits.max_elements:
        raise InvalidArgument(
            f"{numel} elements exceed the limit {limits.max_elements}", field=f"{field}.shape"
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = numel * itemsize
    data = msg.data  # upb materializes a bytes object per access: take it once
    if len(data) != expected:
        raise InvalidArgument(
            f"{len(data)} bytes of data, but shape {list(shape)} of {dtype_name(dtype)} "
            f"needs {expected}",
            field=f"{field}.data",
        )
    if dtype is torch.bool and numel and int(from_buffer(data, torch.uint8, (numel,)).max()) > 1:
        # Any byte other than 0/1 is not a valid bool; torch would not notice.
        raise InvalidArgument("bool tensor bytes must be 0 or 1", field=f"{field}.data")
    return from_buffer(data, dtype, shape)


def from_buffer(data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing `data` without a copy (the caller has validated the length)."""
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # Views over immutable bytes are documented as read-only above.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(data, dtype=dtype)
    return flat.reshape(shape)
