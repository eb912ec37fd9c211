"""Processor-kwargs validation and configuration checks (no vLLM needed)."""

from __future__ import annotations

import pytest

from preprocessor_svc.media import MediaLimits
from preprocessor_svc.kwargs import PROCESSOR_KWARGS, normalize_kwarg
from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import ProcessorConfig
from vlm.errors import InvalidArgument

LIMITS = MediaLimits(max_image_pixels=1_000_000)


def norm(name, value):
    return normalize_kwarg(name, PROCESSOR_KWARGS[name], value, LIMITS)


def test_integral_floats_become_ints():
    """protobuf Struct numbers are doubles; equal requests must hash equally."""
    assert norm("max_pixels", 40000.0) == 40000 and type(norm("max_pixels", 40000.0)) is int
    assert norm("num_frames", 8) == 8
    assert norm("fps", 2) == 2.0 and type(norm("fps", 2)) is float


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_pixels", 1.5),
        ("max_pixels", 0),
        ("max_pixels", 1_000_001),  # capped by MediaLimits.max_image_pixels
        ("max_pixels", "100"),
        ("max_pixels", True),
        ("max_pixels", float("inf")),
        ("min_pixels", -1),
        ("num_frames", 0),
        ("num_frames", 5000),
        ("fps", 0),
        ("fps", 31),
        ("fps", float("nan")),
    ],
)
def test_rejected_values_name_the_field(name, value):
    with pytest.raises(InvalidArgument) as info:
        norm(name, value)
    assert info.value.field == f"processor_options.kwargs.{name}"


def test_every_kwarg_is_documented():
    for name, spec in PROCESSOR_KWARGS.items():
        assert spec.doc and spec.target in ("processor", "video_io"), name


def test_config_validation():
    ProcessorConfig(model="m")
    PoolConfig()
    with pytest.raises(ValueError):
        ProcessorConfig(model="m", model_impl="vllm-native")
    with pytest.raises(ValueError):
        PoolConfig(workers=-1)
    with pytest.raises(ValueError):
        PoolConfig(start_method="fork")
    with pytest.raises(ValueError):
        ProcessorConfig(model="m", allowed_processor_kwargs=frozenset({"nope"}))
