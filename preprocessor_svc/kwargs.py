"""Per-request processor options: the allow-list, validation and where each option goes.

A request may carry `processor_options.kwargs` (a protobuf Struct). Only the options listed in
`PROCESSOR_KWARGS` are accepted, and of those only the ones that apply to the served model
(`ProcessorKwargs.for_model`); each value is validated and normalised (`normalize_kwarg`), then
split into vLLM's `mm_processor_kwargs` (for the HF processor) and `media_io_kwargs["video"]`
(for vLLM's video loader). Both are part of every affected item's hash (vLLM puts them there).

Only options whose effect the model service can still check are offered: an option that changes
an item's feature shapes beyond what the model service derives from the fields alone (Gemma 3's
`do_pan_and_scan`: extra crops that the model service's reference layout, built with the
deployment's processor settings, does not expect) belongs in the deployment-wide
`--mm-processor-kwargs` of BOTH services, not in a request.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from preprocessor_svc.media import MediaLimits
from vlm.errors import InvalidArgument


@dataclass(frozen=True)
class KwargSpec:
    """One allowed per-request processor option.

    `target` says where it goes: "processor" → vLLM's `mm_processor_kwargs` (passed on to the HF
    processor); "video_io" → vLLM's `media_io_kwargs["video"]` (the video loader's frame
    sampling). Both are part of every affected item's hash (vLLM puts them in the hash).
    A "processor" option is offered only if the model's HF image or video processor declares
    it; a "video_io" option only if the model takes videos.
    """

    kind: type
    target: str
    minimum: float | None = None
    maximum: float | None = None
    #: The value must be strictly greater than `minimum`.
    exclusive_minimum: bool = False
    #: MediaLimits attribute that caps the value (e.g. pixels can't exceed max_image_pixels).
    maximum_from_limit: str | None = None
    doc: str = ""


PROCESSOR_KWARGS: Mapping[str, KwargSpec] = {
    "max_pixels": KwargSpec(
        int, "processor", 1, maximum_from_limit="max_image_pixels",
        doc="Qwen2-VL family: upper bound on pixels after resizing (fewer/more patches).",
    ),
    "min_pixels": KwargSpec(
        int, "processor", 1, maximum_from_limit="max_image_pixels",
        doc="Qwen2-VL family: lower bound on pixels after resizing.",
    ),
    "num_frames": KwargSpec(
        int, "video_io", 1, 1024,
        doc="Videos: frames sampled uniformly by vLLM's video loader (default 32). Loaders that "
        "sample by fps (Qwen2-VL) ignore it.",
    ),
    "fps": KwargSpec(
        float, "video_io", 0, 30, exclusive_minimum=True,
        doc="Videos: sampling rate of vLLM's video loader (the smaller of num_frames and "
        "duration * fps wins; Qwen2-VL's loader samples by fps only).",
    ),
}


def normalize_kwarg(name: str, spec: KwargSpec, value: Any, limits: MediaLimits) -> Any:
    """Validate one option; ints arriving as integral floats (protobuf Struct) become ints so
    that equal requests hash equally."""
    path = f"processor_options.kwargs.{name}"
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise InvalidArgument(f"{name} must be a boolean", field=path)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a number", field=path)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{name} must be finite", field=path)
    if spec.kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise InvalidArgument(f"{name} must be an integer", field=path)
            value = int(value)
    else:
        value = float(value)
    maximum = spec.maximum
    if spec.maximum_from_limit is not None:
        maximum = getattr(limits, spec.maximum_from_limit)
    if spec.minimum is not None:
        if spec.exclusive_minimum and value <= spec.minimum:
            raise InvalidArgument(f"{name} must be greater than {spec.minimum}", field=path)
        if value < spec.minimum:
            raise InvalidArgument(f"{name} must be at least {spec.minimum}", field=path)
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"{name} must be at most {maximum}", field=path)
    return value


@dataclass(frozen=True)
class ProcessorKwargs:
    """The options one model offers, and the split of a request's options by target."""

    offered: Mapping[str, KwargSpec]
    limits: MediaLimits

    @classmethod
    def for_model(
        cls,
        mm_processor: Any,
        *,
        takes_video: bool,
        limits: MediaLimits,
        wanted: frozenset[str] | None = None,
    ) -> ProcessorKwargs:
        """A "processor" option is offered only if the model's HF image or video processor
        declares it; a "video_io" option only if the model takes videos. `wanted` (the
        deployment's subset) narrows the list."""
        names = set(PROCESSOR_KWARGS) if wanted is None else set(wanted)
        hf_names: set[str] | None = None
        if mm_processor is not None:
            try:
                hf = mm_processor.info.get_hf_processor()
                hf_names = set()
                for attr in ("image_processor", "video_processor"):
                    valid = getattr(getattr(hf, attr, None), "valid_kwargs", None)
                    if valid is not None:
                        hf_names |= set(typing.get_type_hints(valid))
            except Exception:  # noqa: BLE001 - can't introspect: offer the documented list
                hf_names = None
        offered = {}
        for name in sorted(names):
            spec = PROCESSOR_KWARGS[name]
            if spec.target == "video_io" and not takes_video:
                continue
            if spec.target == "processor" and (
                mm_processor is None or (hf_names is not None and name not in hf_names)
            ):
                continue
            offered[name] = spec
        return cls(offered, limits)

    def split(self, kwargs: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(HF processor kwargs, video loader kwargs), validated and in a stable order (the
        hash covers these dicts in iteration order)."""
        hf: dict[str, Any] = {}
        video_io: dict[str, Any] = {}
        for name, value in (kwargs or {}).items():
            spec = self.offered.get(name)
            if spec is None:
                offered = ", ".join(sorted(self.offered)) or "none"
                raise InvalidArgument(
                    f"unknown or not allowed processor option {name!r} for this model "
                    f"(allowed: {offered})",
                    field=f"processor_options.kwargs.{name}",
                )
            value = normalize_kwarg(name, spec, value, self.limits)
            (hf if spec.target == "processor" else video_io)[name] = value
        return dict(sorted(hf.items())), dict(sorted(video_io.items()))
