"""Validation of preprocessed prompts and sampling parameters, before anything reaches vLLM.

vLLM trusts `mm_input` prompts: a range one token short, a range past the end of the prompt or
a text token inside a range complete silently with wrong output, and a malformed feature tensor
can crash the engine core (taking every in-flight request down). So every request is checked
here first, and each failure raises a `vlm.errors` exception naming the request field at fault
(a dotted path into the wire request, e.g. "prompt.items[1].placeholder.length").

What is checked (`PromptValidator`):

* `prompt.fingerprint` — same model and model_impl as served (`ModelMismatch`).
* `prompt.token_ids` — not empty, every ID in [0, vocab_size); prompt shorter than max_model_len
  (`PromptTooLong`); a placeholder token of a served modality outside every item's range is
  refused (vLLM would embed it as text: the prompt lost an item).
* `prompt.items[i]` — modality served; per-prompt count within the limit (`LimitExceeded`, the
  first item over the limit is named); ranges sorted by offset, non-overlapping, length >= 1,
  inside the prompt; `is_embed` (when given) as long as the range with at least one True; every
  embed position holds one of the modality's placeholder token IDs (non-embed positions may hold
  anything); embed count within vLLM's encoder-cache budget (`LimitExceeded`).
* `prompt.items[i].fields` (items sent with fields, and hash-only items once resolved) — exactly
  the field names the model's processor produces for the modality, each with the processor's
  layout (batched / flat + flat_dim / shared), keep_on_cpu, dtype, rank and non-empty shape;
  dimensions that are the same for every input size are enforced exactly (e.g. LLaVA's
  3x336x336 pixels, Qwen2-VL's 1176-wide patch rows).
* embedding count vs. `is_embed` — enforced where it can be derived cheaply without running
  the model: (a) models whose features have a fixed shape have a fixed embed count per item
  (LLaVA); (b) `*_grid_thw` fields (Qwen2-VL family): embeds = prod(grid) / merge², and flat
  patch rows = prod(grid) x k. GAP: for other variable-size models (e.g. LLaVA-OneVision anyres,
  Pixtral, Idefics3) the count is not checked; the fixed dims, dtypes and layouts still are.
* sampling (`SamplingToParams` in engine_input.py uses `sampling_params`) — vLLM's own
  `SamplingParams` checks (translated once by `translate_sampling_error`), plus stop token IDs
  within the vocabulary, logprobs <= the engine's max_logprobs, and prompt + max_tokens <=
  max_model_len (`PromptTooLong` naming sampling.max_tokens).

How the expectations are derived (`derive_model_spec`, once at start-up, never per request):
vLLM's own multimodal processor (the one the engine built) runs on three dummy items of clearly
different sizes per modality (vLLM's dummy-input builder, with size overrides). From the
outputs it records, per modality: field names, layouts, dtypes, ranks, the dimensions that did
not vary, the token IDs found at embed positions (the placeholder tokens, e.g. `<image>`, or
Pixtral's `[IMG]`), and the count relations above. A dimension is only called fixed when the
three dummy inputs really differed (a dummy builder that ignores the overrides leaves every
dimension free).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields as dc_fields
from typing import Any

import torch

from vlm.errors import InvalidArgument, LimitExceeded, ModelMismatch, PromptTooLong
from vlm.types import FieldLayout, Fingerprint, Item, ItemField, Modality, Prompt, Sampling

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------- specification


@dataclass(frozen=True)
class FieldSpec:
    """What the model's processor produces for one field of one item."""

    name: str
    layout: FieldLayout
    dtype: torch.dtype
    flat_dim: int
    keep_on_cpu: bool
    shape: tuple[int | None, ...]  # None where the size varies between items
    #: Flat fields of grid models: rows along flat_dim == prod(grid) * rows_per_grid.
    rows_per_grid: int | None = None


@dataclass(frozen=True)
class ModalitySpec:
    modality: Modality
    placeholder_token_ids: frozenset[int]
    placeholder_text: str
    max_items: int
    #: Per-item embed budget (vLLM's encoder cache); None if unknown.
    max_embeds_per_item: int | None = None
    #: Field expectations; None when they could not be derived (only generic checks then).
    fields: Mapping[str, FieldSpec] | None = None
    #: Embed count every item has (fixed-shape models), else None.
    fixed_embed_count: int | None = None
    #: Grid field ("image_grid_thw") and prod(grid) / embeds (merge_size²), for grid models.
    grid_field: str | None = None
    grid_per_embed: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    fingerprint: Fingerprint
    vocab_size: int
    max_model_len: int
    max_logprobs: int  # -1: unlimited
    modalities: Mapping[Modality, ModalitySpec] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    """Service limits on top of the engine's own (vLLM's --limit-mm-per-prompt etc.)."""

    #: Lower per-prompt item caps per modality (min with vLLM's limit).
    max_items_per_prompt: Mapping[Modality, int] = field(default_factory=dict)
    #: Bytes of feature tensors sent in one prompt (None: unlimited).
    max_feature_bytes_per_prompt: int | None = None
    #: Enforce the dims derived as fixed at start-up (disable if a processor is misjudged).
    check_fixed_shapes: bool = True


# ------------------------------------------------------------------------------- prompt checks


def _ph(i: int, what: str = "") -> str:
    return f"prompt.items[{i}].placeholder" + (f".{what}" if what else "")


class PromptValidator:
    def __init__(self, spec: ModelSpec, limits: Limits | None = None) -> None:
        self.spec = spec
        self.limits = limits or Limits()
        self._placeholder_ids: dict[int, Modality] = {}
        for m in spec.modalities.values():
            for t in m.placeholder_token_ids:
                self._placeholder_ids.setdefault(t, m.modality)

    # -- the whole prompt, before features are resolved ------------------------------------

    def validate_prompt(self, prompt: Prompt) -> None:
        spec = self.spec
        if not prompt.fingerprint.same_model(spec.fingerprint):
            raise ModelMismatch(
                f"prompt was prepared for {prompt.fingerprint.model_id!r} "
                f"(impl {prompt.fingerprint.model_impl!r}, config {prompt.fingerprint.config_hash[:12]}), "
                f"this service serves {spec.fingerprint.model_id!r} "
                f"(impl {spec.fingerprint.model_impl!r}, config {spec.fingerprint.config_hash[:12]})",
                field="prompt.fingerprint",
            )
        ids = prompt.token_ids
        n = len(ids)
        if n == 0:
            raise InvalidArgument("token_ids must not be empty", field="prompt.token_ids")
        vocab = spec.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            k, t = next((k, t) for k, t in enumerate(ids) if not 0 <= t < vocab)
            raise InvalidArgument(
                f"token ID {t} is outside the vocabulary [0, {vocab})", field=f"prompt.token_ids[{k}]"
            )
        if n >= spec.max_model_len:
            raise PromptTooLong(
                f"prompt has {n} tokens; the model's max length is {spec.max_model_len} "
                "(prompt plus at least one generated token)",
                field="prompt.token_ids",
            )

        counts: Counter[Modality] = Counter()
        prev_end = 0
        feature_bytes = 0
        covered = bytearray(n)  # 1 where some item's range covers the position
        for i, item in enumerate(prompt.items):
            mspec = spec.modalities.get(item.modality)
            if mspec is None:
                served = ", ".join(m.value for m in spec.modalities) or "none"
                raise InvalidArgument(
                    f"modality {item.modality.value!r} is not served by this model (served: {served})",
                    field=f"prompt.items[{i}].modality",
                )
            counts[item.modality] += 1
            limit = min(mspec.max_items, self.limits.max_items_per_prompt.get(item.modality, mspec.max_items))
            if counts[item.modality] > limit:
                raise LimitExceeded(
                    f"more than {limit} {item.modality.value} item(s) in one prompt",
                    field=f"prompt.items[{i}]",
                )
            if not item.hash:
                raise InvalidArgument("hash must be set", field=f"prompt.items[{i}].hash")
            self._check_range(i, item, prev_end, n)
            ph = item.placeholder
            prev_end = ph.end
            covered[ph.offset : ph.end] = b"\x01" * ph.length
            self._check_placeholder_tokens(i, item, mspec, ids)
            if item.fields is not None:
                self.validate_item_fields(i, item)
                feature_bytes += item.nbytes
        max_bytes = self.limits.max_feature_bytes_per_prompt
        if max_bytes is not None and feature_bytes > max_bytes:
            raise LimitExceeded(
                f"{feature_bytes} bytes of item features exceed the limit of {max_bytes} per prompt",
                field="prompt.items",
            )
        if self._placeholder_ids and not self._placeholder_ids.keys().isdisjoint(ids):
            for k, t in enumerate(ids):
                if not covered[k] and t in self._placeholder_ids:
                    raise InvalidArgument(
                        f"placeholder token {t} ({self._placeholder_ids[t].value}) lies outside "
                        "every item's range (an item is missing or a range is wrong)",
                        field=f"prompt.token_ids[{k}]",
                    )

    def _check_range(self, i: int, item: Item, prev_end: int, n: int) -> None:
        ph = item.placeholder
        if ph.offset < prev_end:
            raise InvalidArgument(
                f"range starts at {ph.offset}, before the previous item's range ends ({prev_end}); "
                "items must be sorted by offset and must not overlap",
                field=_ph(i, "offset"),
            )
        if ph.offset >= n:
            raise InvalidArgument(
                f"offset {ph.offset} is outside the prompt ({n} tokens)", field=_ph(i, "offset")
            )
        if ph.length < 1:
            raise InvalidArgument("length must be at least 1", field=_ph(i, "length"))
        if ph.end > n:
            raise InvalidArgument(
                f"range [{ph.offset}, {ph.end}) runs past the end of the prompt ({n} tokens)",
                field=_ph(i, "length"),
            )
        if ph.is_embed is not None:
            if len(ph.is_embed) != ph.length:
                raise InvalidArgument(
                    f"is_embed has {len(ph.is_embed)} entries for a range of length {ph.length}",
                    field=_ph(i, "is_embed"),
                )
            if not any(ph.is_embed):
                raise InvalidArgument("is_embed marks no position", field=_ph(i, "is_embed"))

    def _check_placeholder_tokens(
        self, i: int, item: Item, mspec: ModalitySpec, ids: Sequence[int]
    ) -> None:
        ph = item.placeholder
        embeds = ph.embed_count()
        if mspec.max_embeds_per_item is not None and embeds > mspec.max_embeds_per_item:
            raise LimitExceeded(
                f"item has {embeds} embedding positions; the engine's encoder cache holds at most "
                f"{mspec.max_embeds_per_item} per item",
                field=_ph(i, "is_embed" if ph.is_embed is not None else "length"),
            )
        allowed = mspec.placeholder_token_ids
        if not allowed:
            return
        for j in range(ph.length):
            if ph.is_embed is not None and not ph.is_embed[j]:
                continue
            t = ids[ph.offset + j]
            if t not in allowed:
                raise InvalidArgument(
                    f"position {ph.offset + j} is an embedding position of this "
                    f"{item.modality.value} item but holds token {t}, not a placeholder token "
                    f"{sorted(allowed)}",
                    field=f"prompt.token_ids[{ph.offset + j}]",
                )

    # -- features ----------------------------------------------------------------------------

    def validate_item_fields(self, i: int, item: Item) -> None:
        """Fields of one item against the modality's field specs, and the embed count."""
        assert item.fields is not None
        mspec = self.spec.modalities.get(item.modality)
        base = f"prompt.items[{i}].fields"
        if not item.fields:
            raise InvalidArgument("an item sent with fields needs at least one", field=base)
        if mspec is None or mspec.fields is None:
            for name, f in item.fields.items():
                self._check_nonempty(f, f"{base}.{name}")
            return
        for name in mspec.fields:
            if name not in item.fields:
                raise InvalidArgument(
                    f"required field {name!r} is missing (expected {sorted(mspec.fields)})",
                    field=f"{base}.{name}",
                )
        for name, f in item.fields.items():
            fs = mspec.fields.get(name)
            path = f"{base}.{name}"
            if fs is None:
                raise InvalidArgument(
                    f"unexpected field {name!r} for {item.modality.value} "
                    f"(expected {sorted(mspec.fields)})",
                    field=path,
                )
            self._check_field(f, fs, path)
        self._check_embed_count(i, item, mspec)

    def _check_nonempty(self, f: ItemField, path: str) -> None:
        if f.data.numel() == 0:
            raise InvalidArgument(
                f"empty tensor of shape {list(f.data.shape)}", field=f"{path}.tensor.shape"
            )

    def _check_field(self, f: ItemField, fs: FieldSpec, path: str) -> None:
        if f.layout is not fs.layout:
            raise InvalidArgument(
                f"layout {f.layout.value} but the model expects {fs.layout.value}", field=f"{path}.layout"
            )
        data = f.data
        if fs.layout is FieldLayout.FLAT:
            dim = f.flat_dim + data.dim() if f.flat_dim < 0 else f.flat_dim
            if dim != fs.flat_dim:
                raise InvalidArgument(
                    f"flat_dim {f.flat_dim} but the model expects {fs.flat_dim}", field=f"{path}.flat_dim"
                )
        if f.keep_on_cpu != fs.keep_on_cpu:
            raise InvalidArgument(
                f"keep_on_cpu {f.keep_on_cpu} but the model expects {fs.keep_on_cpu}",
                field=f"{path}.keep_on_cpu",
            )
        if data.dtype != fs.dtype:
            raise InvalidArgument(
                f"dtype {_dtype(data.dtype)} but the model expects {_dtype(fs.dtype)}",
                field=f"{path}.tensor.dtype",
            )
        shape = tuple(data.shape)
        if len(shape) != len(fs.shape):
            raise InvalidArgument(
                f"shape {list(shape)} has rank {len(shape)}; the model expects rank {len(fs.shape)}",
                field=f"{path}.tensor.shape",
            )
        self._check_nonempty(f, path)
        if self.limits.check_fixed_shapes:
            for d, (got, want) in enumerate(zip(shape, fs.shape, strict=True)):
                if want is not None and got != want:
                    expected = ["*" if w is None else w for w in fs.shape]
                    raise InvalidArgument(
                        f"shape {list(shape)} does not match the model's {expected} (dim {d})",
                        field=f"{path}.tensor.shape",
                    )

    def _check_embed_count(self, i: int, item: Item, mspec: ModalitySpec) -> None:
        assert item.fields is not None
        ph = item.placeholder
        embeds = ph.embed_count()
        where = _ph(i, "is_embed" if ph.is_embed is not None else "length")
        if mspec.fixed_embed_count is not None and self.limits.check_fixed_shapes:
            if embeds != mspec.fixed_embed_count:
                raise InvalidArgument(
                    f"item has {embeds} embedding positions; this model's {item.modality.value} "
                    f"items always have {mspec.fixed_embed_count}",
                    field=where,
                )
        if mspec.grid_field is not None and mspec.grid_field in item.fields:
            gpath = f"prompt.items[{i}].fields.{mspec.grid_field}.tensor"
            grid = item.fields[mspec.grid_field].data
            if grid.dtype.is_floating_point or grid.dtype == torch.bool or grid.numel() == 0:
                raise InvalidArgument("grid must hold positive integers", field=gpath)
            values = [int(v) for v in grid.reshape(-1).tolist()]
            if any(v <= 0 for v in values):
                raise InvalidArgument(f"grid {values} must hold positive integers", field=gpath)
            cells = math.prod(values)
            if mspec.grid_per_embed:
                if cells % mspec.grid_per_embed or cells // mspec.grid_per_embed != embeds:
                    raise InvalidArgument(
                        f"grid {values} gives {cells / mspec.grid_per_embed:g} embeddings but the "
                        f"item has {embeds} embedding positions",
                        field=where,
                    )
            for name, fs in (mspec.fields or {}).items():
                if fs.rows_per_grid is None or name not in item.fields:
                    continue
                rows = item.fields[name].data.shape[fs.flat_dim]
                if rows != cells * fs.rows_per_grid:
                    raise InvalidArgument(
                        f"{rows} rows along dim {fs.flat_dim}, but grid {values} needs "
                        f"{cells * fs.rows_per_grid}",
                        field=f"prompt.items[{i}].fields.{name}.tensor.shape",
                    )

    def validate_resolved(self, items: Sequence[Item]) -> None:
        """After hash-only items got their fields from the store: check those too."""
        for i, item in enumerate(items):
            if item.fields is not None:
                mspec = self.spec.modalities.get(item.modality)
                if mspec is not None and mspec.fields is not None:
                    self._check_embed_count(i, item, mspec)

    # -- sampling ----------------------------------------------------------------------------

    def validate_sampling(self, sampling: Sampling, prompt_len: int) -> None:
        spec = self.spec
        for k, t in enumerate(sampling.stop_token_ids):
            if not 0 <= t < spec.vocab_size:
                raise InvalidArgument(
                    f"stop token ID {t} is outside the vocabulary [0, {spec.vocab_size})",
                    field=f"sampling.stop_token_ids[{k}]",
                )
        if sampling.logprobs is not None and spec.max_logprobs >= 0 and sampling.logprobs > spec.max_logprobs:
            raise InvalidArgument(
                f"logprobs {sampling.logprobs} exceeds the engine's maximum {spec.max_logprobs}",
                field="sampling.logprobs",
            )
        if sampling.max_tokens is not None and sampling.max_tokens >= 1:
            if prompt_len + sampling.max_tokens > spec.max_model_len:
                raise PromptTooLong(
                    f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                    f"model's max length {spec.max_model_len}",
                    field="sampling.max_tokens",
                )


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


_SAMPLING_FIELDS = frozenset(f.name for f in dc_fields(Sampling))
_LEADING_NAME = re.compile(r"^\s*([a-z_]+)\b")


def translate_sampling_error(e: Exception) -> InvalidArgument:
    """vLLM's SamplingParams error (`VLLMValidationError`, `ValueError`) → InvalidArgument
    naming `sampling.<field>` (from the error's `parameter`, else the message's first word)."""
    name = getattr(e, "parameter", None)
    if not name:
        m = _LEADING_NAME.match(str(e))
        name = m.group(1) if m else None
    field_name = f"sampling.{name}" if name in _SAMPLING_FIELDS else "sampling"
    message = str(e.args[0]) if e.args else str(e)
    return InvalidArgument(message, field=field_name)


# ------------------------------------------------------------------------------- derivation

#: Dummy sizes per modality: clearly different sizes and aspect ratios (videos and audio come
#: from vLLM's dummy builder, which can only shrink its largest input: sizes may then coincide,
#: and no dimension is taken as fixed).
_IMAGE_SIZES = ((64, 64), (320, 40), (150, 200))  # (width, height)
_VIDEO_SIZES = ((2, 64, 64), (4, 96, 48), (6, 48, 112))  # (frames, width, height)
_AUDIO_LENGTHS = (1600, 4000, 8000)


@dataclass
class _Probe:
    signature: Any
    fields: dict[str, ItemField]
    embed_count: int
    embed_token_ids: set[int]
    engine_input: Any  # the processor's MultiModalInput


def _dummy_options(modality: Modality, k: int) -> Any:
    from vllm.config.multimodal import AudioDummyOptions, ImageDummyOptions, VideoDummyOptions

    if modality is Modality.IMAGE:
        w, h = _IMAGE_SIZES[k]
        return ImageDummyOptions(count=1, width=w, height=h)
    if modality is Modality.VIDEO:
        f, w, h = _VIDEO_SIZES[k]
        return VideoDummyOptions(count=1, num_frames=f, width=w, height=h)
    return AudioDummyOptions(count=1, length=_AUDIO_LENGTHS[k])


def _media_signature(x: Any) -> Any:
    if hasattr(x, "size") and hasattr(x, "mode"):  # PIL image
        return ("pil", tuple(x.size))
    shape = getattr(x, "shape", None)
    if shape is not None:
        return ("array", tuple(int(s) for s in shape))
    if isinstance(x, Mapping):
        return tuple(sorted((str(k), _media_signature(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_media_signature(v) for v in x)
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return type(x).__name__


def _probe(processor: Any, modality: Modality, k: int, seq_len: int) -> _Probe:
    from vllm.config.multimodal import MultiModalDummyOptions
    from vllm.multimodal.processing.context import TimingContext

    from vlm.vllm_mm import item_fields

    name = modality.value
    opts = MultiModalDummyOptions({name: _dummy_options(modality, k)})
    inputs = processor.get_dummy_inputs(seq_len, {name: 1}, opts)
    if modality is Modality.IMAGE:
        # vLLM's dummy builder only shrinks its (largest) image; use our own sizes instead.
        from PIL import Image

        image = Image.new("RGB", _IMAGE_SIZES[k], color=(255, 128, 0))
        items = processor.info.parse_mm_data({name: [image]}, validate=False)
        inputs = dataclasses.replace(inputs, mm_data_items=items)
    signature = _media_signature(inputs.mm_data_items[name].get(0))
    out = processor.apply(inputs, TimingContext(enabled=False))
    kw = out["mm_kwargs"][name][0]
    rng = out["mm_placeholders"][name][0]
    ids = out["prompt_token_ids"]
    is_embed = None if rng.is_embed is None else [bool(v) for v in rng.is_embed.tolist()]
    embed_ids = {
        int(ids[rng.offset + j])
        for j in range(rng.length)
        if is_embed is None or is_embed[j]
    }
    embeds = rng.length if is_embed is None else sum(is_embed)
    return _Probe(signature, item_fields(kw), embeds, embed_ids, out)


def _config_token_ids(hf_config: Any, modality: Modality) -> set[int]:
    names = {
        Modality.IMAGE: ("image_token_id", "image_token_index"),
        Modality.VIDEO: ("video_token_id", "video_token_index"),
        Modality.AUDIO: ("audio_token_id", "audio_token_index"),
    }[modality]
    out: set[int] = set()
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        for n in names:
            v = getattr(cfg, n, None) if cfg is not None else None
            if isinstance(v, int) and v >= 0:
                out.add(v)
    return out


def _modality_spec_from_probes(
    modality: Modality, probes: list[_Probe], base: dict[str, Any]
) -> ModalitySpec:
    first = probes[0]
    names = set(first.fields)
    if any(set(p.fields) != names for p in probes):
        log.warning("%s: field names vary with the input size; checking names only loosely", modality.value)
        return ModalitySpec(modality=modality, **base)
    inputs_differ = len({repr(p.signature) for p in probes}) == len(probes)
    fields: dict[str, FieldSpec] = {}
    all_fixed = True
    for name in sorted(names):
        ref = first.fields[name]
        shapes = [tuple(p.fields[name].data.shape) for p in probes]
        if len({len(s) for s in shapes}) != 1:
            shape: tuple[int | None, ...] = tuple([None] * len(shapes[0]))
            log.warning("%s.%s: rank varies with the input size", modality.value, name)
        elif inputs_differ:
            shape = tuple(d if all(s[j] == d for s in shapes) else None for j, d in enumerate(shapes[0]))
        else:
            shape = tuple([None] * len(shapes[0]))
        if any(d is None for d in shape):
            all_fixed = False
        fields[name] = FieldSpec(
            name=name,
            layout=ref.layout,
            dtype=ref.data.dtype,
            flat_dim=ref.flat_dim if ref.flat_dim >= 0 else ref.flat_dim + ref.data.dim(),
            keep_on_cpu=ref.keep_on_cpu,
            shape=shape,
        )
    fixed_embeds = None
    if inputs_differ and all_fixed and len({p.embed_count for p in probes}) == 1:
        fixed_embeds = first.embed_count

    grid_field = None
    grid_per_embed = None
    for name in sorted(names):
        if not name.endswith("grid_thw"):
            continue
        grids = [p.fields[name].data for p in probes]
        if any(g.dtype.is_floating_point or g.numel() == 0 for g in grids):
            continue
        cells = [math.prod(int(v) for v in g.reshape(-1).tolist()) for g in grids]
        ratios = {c // p.embed_count if p.embed_count and c % p.embed_count == 0 else None for c, p in zip(cells, probes)}
        if len(ratios) == 1 and None not in ratios:
            grid_field, grid_per_embed = name, ratios.pop()
            for fname, fs in list(fields.items()):
                if fs.layout is not FieldLayout.FLAT:
                    continue
                rows = [p.fields[fname].data.shape[fs.flat_dim] for p in probes]
                per = {r // c if c and r % c == 0 else None for r, c in zip(rows, cells)}
                if len(per) == 1 and None not in per:
                    fields[fname] = FieldSpec(**{**fs.__dict__, "rows_per_grid": per.pop()})
            break
    return ModalitySpec(
        modality=modality,
        fields=fields,
        fixed_embed_count=fixed_embeds,
        grid_field=grid_field,
        grid_per_embed=grid_per_embed,
        **base,
    )


def derive_model_spec(
    vllm_config: Any,
    renderer: Any,
    fingerprint: Fingerprint,
    *,
    encoder_cache_size: int | None = None,
) -> tuple[ModelSpec, dict[Modality, Any]]:
    """Probe vLLM's processor (see the module docstring). Returns the spec and, per modality,
    the smallest dummy `MultiModalInput` (usable for a warm-up generation)."""
    from vllm.model_executor.model_loader import get_model_architecture

    model_config = vllm_config.model_config
    modalities: dict[Modality, ModalitySpec] = {}
    dummies: dict[Modality, Any] = {}
    processor = getattr(renderer, "mm_processor", None)
    if processor is not None:
        model_cls, _ = get_model_architecture(model_config)
        allowed = processor.info.allowed_mm_limits
        seq_len = model_config.max_model_len
        for name, limit in allowed.items():
            try:
                modality = Modality(name)
            except ValueError:
                log.warning("modality %r is not supported by this service; ignored", name)
                continue
            if limit <= 0:
                continue
            try:
                text = model_cls.get_placeholder_str(name, 1) or ""
            except Exception:  # noqa: BLE001
                text = ""
            base: dict[str, Any] = {
                "placeholder_text": text,
                "max_items": int(limit),
                "max_embeds_per_item": encoder_cache_size,
            }
            try:
                probes = [_probe(processor, modality, k, seq_len) for k in range(3)]
            except Exception:  # noqa: BLE001 - some processors cannot build small dummies
                log.warning("%s: could not probe the processor; generic checks only", name, exc_info=True)
                ids = _config_token_ids(model_config.hf_config, modality)
                modalities[modality] = ModalitySpec(
                    modality=modality, placeholder_token_ids=frozenset(ids), **base
                )
                continue
            token_ids = set().union(*(p.embed_token_ids for p in probes))
            if not base["placeholder_text"] and len(token_ids) == 1:
                # e.g. Pixtral/Mistral3 (vLLM gives no placeholder string): "[IMG]".
                with contextlib.suppress(Exception):
                    base["placeholder_text"] = str(
                        processor.info.get_tokenizer().convert_ids_to_tokens(next(iter(token_ids)))
                    )
            modalities[modality] = _modality_spec_from_probes(
                modality, probes, {**base, "placeholder_token_ids": frozenset(token_ids)}
            )
            dummies[modality] = min(probes, key=lambda p: len(p.engine_input["prompt_token_ids"])).engine_input
    spec = ModelSpec(
        fingerprint=fingerprint,
        vocab_size=int(model_config.get_vocab_size()),
        max_model_len=int(model_config.max_model_len),
        max_logprobs=int(getattr(model_config, "max_logprobs", 20)),
        modalities=modalities,
    )
    return spec, dummies
