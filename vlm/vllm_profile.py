"""Build the `ModelProfile` from vLLM's config and renderer: the one derivation of model facts.

Both services call `build_profile(vllm_config, renderer, ...)` at start-up (the model service
with its engine's renderer, each preprocessor worker with its own), so they derive the same
profile by the same code. Nothing here runs per request.

How the multimodal facts are derived: vLLM's own multimodal processor runs on three dummy items
of clearly different sizes per modality (vLLM's dummy-input builder, with size overrides). From
the outputs it records, per modality: field names, layouts, dtypes, ranks, the dimensions that
did not vary, the token IDs found at embed positions (the placeholder tokens, e.g. `<image>`, or
Pixtral's `[IMG]`), and the count relations (a fixed embed count for fixed-shape models; for
`*_grid_thw` models, embeds = prod(grid) / merge² and flat rows = prod(grid) × k). A dimension is
only called fixed when the three dummy inputs really differed (a dummy builder that ignores the
overrides leaves every dimension free). The placeholder text is the model class's own
(`get_placeholder_str`), and its count token the one token of that text that no other modality's
text has (e.g. Gemma 3's `<start_of_image>`, which expands to soft tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlm.codec import dtype_name
from vlm.fingerprint import compute_fingerprint
from vlm.profile import FieldSpec, ModalityProfile, ModelProfile, SizeSource
from vlm.types import FieldLayout, ItemField, Modality, Placeholder

log = logging.getLogger(__name__)

#: Dummy sizes per modality: clearly different sizes and aspect ratios (videos and audio come
#: from vLLM's dummy builder, which can only shrink its largest input: sizes may then coincide,
#: and no dimension is taken as fixed).
_IMAGE_SIZES = ((64, 64), (320, 40), (150, 200))  # (width, height)
_VIDEO_SIZES = ((2, 64, 64), (4, 96, 48), (6, 48, 112))  # (frames, width, height)
_AUDIO_LENGTHS = (1600, 4000, 8000)


def build_profile(
    vllm_config: Any, renderer: Any, *, model: str, model_impl: str, revision: str | None = None
) -> tuple[ModelProfile, dict[Modality, Any]]:
    """The profile, and per modality the smallest dummy `MultiModalInput` (a warm-up input)."""
    model_config = vllm_config.model_config
    fingerprint = compute_fingerprint(
        model, model_impl, revision=revision, feature_dtype=dtype_name(model_config.dtype)
    )
    modalities: dict[Modality, ModalityProfile] = {}
    dummies: dict[Modality, Any] = {}
    processor = getattr(renderer, "mm_processor", None)
    if processor is not None:
        texts = _placeholder_texts(model_config, processor)
        count_tokens = _count_tokens(renderer.get_tokenizer(), texts)
        allowed = processor.info.allowed_mm_limits
        for modality, text in texts.items():
            limit = int(allowed.get(modality.value, 0))
            if limit <= 0:
                continue
            base: dict[str, Any] = {
                "modality": modality,
                "placeholder_text": text,
                "max_items": limit,
                "count_token_id": count_tokens.get(modality),
            }
            try:
                probes = [_probe(processor, modality, k, model_config.max_model_len) for k in range(3)]
            except Exception:  # noqa: BLE001 - some processors cannot build small dummies
                # Loud: a weaker validation must be visible (also as
                # vlm_model_profile_field_checks{modality} = 0 on both services).
                log.error("%s: could not probe vLLM's processor: field shapes, dtypes and embed "
                          "counts will NOT be checked, only generic checks apply",
                          modality.value, exc_info=True)
                ids = _config_token_ids(model_config.hf_config, modality)
                modalities[modality] = ModalityProfile(placeholder_token_ids=frozenset(ids), **base)
                continue
            token_ids = frozenset().union(*(p.embed_token_ids for p in probes))
            facts = _field_facts(modality, probes)
            facts.update(_layout_facts(processor, modality, probes, facts, model_config.max_model_len))
            modalities[modality] = ModalityProfile(placeholder_token_ids=token_ids, **base, **facts)
            if modalities[modality].layout_check == "none":
                log.error("%s: no relation between an item's fields and its placeholder was "
                          "found: the model service cannot check that features fit their "
                          "placeholders (vlm_model_profile_layout_check{check=\"none\"})",
                          modality.value)
            dummies[modality] = min(
                probes, key=lambda p: len(p.engine_input["prompt_token_ids"])
            ).engine_input
    profile = ModelProfile(
        fingerprint=fingerprint,
        vocab_size=int(model_config.get_vocab_size()),
        max_model_len=int(model_config.max_model_len),
        max_logprobs=int(getattr(model_config, "max_logprobs", 20)),
        eos_token_ids=_eos_ids(renderer, model_config),
        modalities=modalities,
    )
    return profile, dummies


# ------------------------------------------------------------------------------- text facts


def _placeholder_texts(model_config: Any, processor: Any) -> dict[Modality, str]:
    from vllm.model_executor.model_loader.utils import get_model_cls

    supported = processor.info.get_supported_mm_limits()
    model_cls = get_model_cls(model_config)
    texts: dict[Modality, str] = {}
    for m in Modality:
        if m.value not in supported:
            continue
        text = None
        with contextlib.suppress(Exception):
            text = model_cls.get_placeholder_str(m.value, 1)
        if not text:  # e.g. Pixtral/Mistral3: vLLM's dummy text ("[IMG]")
            text = processor.dummy_inputs.get_dummy_text({m.value: 1})
        texts[m] = text
    return texts


def _count_tokens(tokenizer: Any, texts: Mapping[Modality, str]) -> dict[Modality, int]:
    """Per modality, the one token of its placeholder text that no other modality's text has."""
    ids = {m: tokenizer.encode(t, add_special_tokens=False) for m, t in texts.items()}
    special: set[int] = set(getattr(tokenizer, "all_special_ids", ()) or ())
    with contextlib.suppress(Exception):
        special |= set(tokenizer.get_added_vocab().values())
    out: dict[Modality, int] = {}
    for m, own in ids.items():
        others = {t for o, o_ids in ids.items() if o != m for t in o_ids}
        distinct = [t for t in own if t not in others]
        if len(set(distinct)) > 1:  # e.g. a SentencePiece "▁" before the placeholder
            distinct = [t for t in distinct if tokenizer.decode([t]).strip()] or distinct
        if len(set(distinct)) > 1:
            distinct = [t for t in distinct if t in special] or distinct
        if len(set(distinct)) == 1:
            out[m] = int(distinct[0])
        else:
            log.warning("%s: no single placeholder token in %r; the placeholder count check is "
                        "off for it", m.value, texts[m])
    return out


def _eos_ids(renderer: Any, model_config: Any) -> tuple[int, ...]:
    ids: list[int] = []
    with contextlib.suppress(Exception):
        eos = renderer.get_eos_token_id()
        if isinstance(eos, int):
            ids.append(eos)
    gen = model_config.try_get_generation_config() or {}
    extra = gen.get("eos_token_id")
    for t in extra if isinstance(extra, (list, tuple)) else [extra]:
        if isinstance(t, int) and t not in ids:
            ids.append(t)
    return tuple(ids)


def _config_token_ids(hf_config: Any, modality: Modality) -> set[int]:
    names = (f"{modality.value}_token_id", f"{modality.value}_token_index")
    out: set[int] = set()
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        for n in names:
            v = getattr(cfg, n, None) if cfg is not None else None
            if isinstance(v, int) and v >= 0:
                out.add(v)
    return out


# ------------------------------------------------------------------------------- the probe


@dataclass
class _Probe:
    signature: Any
    fields: dict[str, ItemField]
    placeholder: Placeholder
    embed_token_ids: set[int]
    engine_input: Any  # the processor's MultiModalInput

    @property
    def embed_count(self) -> int:
        return self.placeholder.embed_count()


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
    from vlm.vllm_layout import process_one
    from vlm.vllm_mm import item_fields, placeholder_from_range

    replace = None
    if modality is Modality.IMAGE:
        # vLLM's dummy builder only shrinks its (largest) image; use our own sizes instead.
        from PIL import Image

        replace = lambda _: Image.new("RGB", _IMAGE_SIZES[k], color=(255, 128, 0))  # noqa: E731
    media, out = process_one(processor, modality, _dummy_options(modality, k), seq_len, replace)
    name = modality.value
    ph = placeholder_from_range(out["mm_placeholders"][name][0])
    ids = out["prompt_token_ids"]
    embed_ids = {
        int(ids[ph.offset + j]) for j in range(ph.length) if ph.is_embed is None or ph.is_embed[j]
    }
    return _Probe(_media_signature(media), item_fields(out["mm_kwargs"][name][0]), ph, embed_ids, out)


def _field_facts(modality: Modality, probes: list[_Probe]) -> dict[str, Any]:
    """ModalityProfile's field specs and count relations, from three probes."""
    first = probes[0]
    names = set(first.fields)
    if any(set(p.fields) != names for p in probes):
        log.warning("%s: field names vary with the input size; checking names only loosely",
                    modality.value)
        return {}
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
            shape = tuple(
                d if all(s[j] == d for s in shapes) else None for j, d in enumerate(shapes[0])
            )
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
        ratios = {
            c // p.embed_count if p.embed_count and c % p.embed_count == 0 else None
            for c, p in zip(cells, probes)
        }
        if len(ratios) == 1 and None not in ratios:
            grid_field, grid_per_embed = name, ratios.pop()
            for fname, fs in list(fields.items()):
                if fs.layout is not FieldLayout.FLAT:
                    continue
                rows = [p.fields[fname].data.shape[fs.flat_dim] for p in probes]
                per = {r // c if c and r % c == 0 else None for r, c in zip(rows, cells)}
                if len(per) == 1 and None not in per:
                    fields[fname] = dataclasses.replace(fs, rows_per_grid=per.pop())
            break
    return {
        "fields": fields,
        "fixed_embed_count": fixed_embeds,
        "grid_field": grid_field,
        "grid_per_embed": grid_per_embed,
    }


# ------------------------------------------------------------------------------- layout relations


def _layout_facts(
    processor: Any, modality: Modality, probes: list[_Probe], facts: Mapping[str, Any], seq_len: int
) -> dict[str, Any]:
    """How an item's fields fix its placeholder, beyond the grid and fixed-count relations.

    1. `size_source`: a field that gives the media's size, such that vLLM's processor run on a
       stand-in of that size reproduces each probe exactly (fields, placeholder). Candidates: a
       2-integer field (height, width), then the last two dims of each field of rank >= 3.
    2. Otherwise `embeds_per_row`: embeds == k x rows (dim 0) of one field, on every probe, with
       rows that differ between probes.
    Plus `row_counts`: 0-dim integer fields equal to another field's row count on every probe.
    """
    import torch

    from vlm.vllm_layout import reference, size_of

    first = probes[0].fields
    out: dict[str, Any] = {}
    counts = []
    for cname, cf in sorted(first.items()):
        if cf.data.dim() != 0 or cf.data.dtype.is_floating_point or cf.data.dtype == torch.bool:
            continue
        for rname, rf in sorted(first.items()):
            if rname != cname and rf.data.dim() >= 1 and all(
                int(p.fields[cname].data) == p.fields[rname].data.shape[0] for p in probes
            ):
                counts.append((cname, rname))
                break
    out["row_counts"] = tuple(counts)
    if facts.get("grid_field") is not None or not facts.get("fields"):
        return out
    inputs_differ = len({repr(p.signature) for p in probes}) == len(probes)
    if not inputs_differ:
        return out

    candidates: list[SizeSource] = []
    for name, f in sorted(first.items()):
        if not f.data.dtype.is_floating_point and f.data.dtype != torch.bool and f.data.numel() == 2:
            candidates.append(SizeSource(name, "hw_values"))
    for name, f in sorted(first.items()):
        if f.data.dim() >= 3:  # pixels (float, or uint8 as Mistral 3's)
            candidates.append(SizeSource(name, "hw_dims"))
    for source in candidates:
        try:
            ok = all(_reproduces(p, reference(processor, modality, size_of(modality, source, p.fields),
                                              seq_len)) for p in probes)
        except Exception:  # noqa: BLE001 - a candidate vLLM cannot run is no source
            log.debug("%s: %s does not give the size", modality.value, source, exc_info=True)
            ok = False
        if ok:
            out["size_source"] = source
            return out

    for name, f in sorted(first.items()):
        if f.data.dim() < 1:
            continue
        rows = [p.fields[name].data.shape[0] for p in probes]
        if len(set(rows)) < 2 or any(r == 0 or p.embed_count % r for r, p in zip(rows, probes)):
            continue
        ks = {p.embed_count // r for r, p in zip(rows, probes)}
        if len(ks) == 1:
            out["embeds_per_row"] = (name, ks.pop())
            return out
    return out


def _reproduces(probe: _Probe, ref: Any) -> bool:
    from vlm.vllm_layout import small_int_values

    return (
        ref.shapes == {n: tuple(f.data.shape) for n, f in probe.fields.items()}
        and ref.values == small_int_values(probe.fields)
        and ref.length == probe.placeholder.length
        and ref.is_embed == probe.placeholder.is_embed
    )
