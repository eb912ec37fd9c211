"""Domain request → vLLM engine input: `PromptToEngineInput` and `SamplingToParams`.

`PromptToEngineInput` rebuilds exactly what vLLM's frontend would hand its engine after its own
multimodal processing, from a validated `vlm.types.Prompt` whose items all carry fields:

* `mm_kwargs`: a `MultiModalKwargsItems` — per modality, in prompt order, one
  `MultiModalKwargsItem` per item, mapping each field name to `MultiModalFieldElem(data, field)`
  with the field rebuilt per item: `MultiModalBatchedField`, `MultiModalFlatField` (one slice
  covering this item's own tensor along `dim`) or `MultiModalSharedField(batch_size=1)`, each
  with the item's `keep_on_cpu`;
* `mm_placeholders`: per modality, `PlaceholderRange(offset, length, is_embed)` with `is_embed`
  a 1-D torch.bool tensor (or None when every position embeds);
* `mm_hashes`: per modality, the items' content hashes — vLLM keys its encoder cache and the
  prefix-cache block hashes by them;

and passes them through `vllm.inputs.mm_input(...)` (a dict with a "type" key, which
`AsyncLLM.generate` takes as is: the HF processor never runs per request). A prompt without
items becomes `vllm.inputs.tokens_input(...)`.

`SamplingToParams` turns `vlm.types.Sampling` into vLLM `SamplingParams` with
`RequestOutputKind.DELTA` (so vLLM's incremental detokenizer produces the text deltas), unset
fields taking the model's generation-config defaults as vLLM's OpenAI server does, and vLLM's
ValueErrors translated into InvalidArgument naming `sampling.<field>`.

`fields_from_kwargs_item` / `items_from_engine_input` are the inverse direction (vLLM → domain),
used by the start-up probe and by `vlm.testing.prompts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlm.types import FieldLayout, Item, ItemField, Modality, Placeholder, Prompt, Sampling

from .validation import translate_sampling_error

# ------------------------------------------------------------------------------- domain → vLLM


def _vllm_field(f: ItemField) -> Any:
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFlatField,
        MultiModalSharedField,
    )

    if f.layout is FieldLayout.BATCHED:
        return MultiModalBatchedField(keep_on_cpu=f.keep_on_cpu)
    if f.layout is FieldLayout.FLAT:
        dim = f.flat_dim + f.data.dim() if f.flat_dim < 0 else f.flat_dim
        n = int(f.data.shape[dim])
        per_item = (slice(None),) * dim + (slice(0, n),)
        return MultiModalFlatField(
            slices=[per_item if dim else slice(0, n)], dim=dim, keep_on_cpu=f.keep_on_cpu
        )
    if f.layout is FieldLayout.SHARED:
        return MultiModalSharedField(batch_size=1, keep_on_cpu=f.keep_on_cpu)
    raise ValueError(f"unknown layout {f.layout!r}")


class PromptToEngineInput:
    """A validated, resolved Prompt (every item has fields) → vLLM engine input."""

    def __call__(self, prompt: Prompt) -> Any:
        from vllm.inputs import mm_input, tokens_input

        token_ids = list(prompt.token_ids)
        if not prompt.items:
            return tokens_input(token_ids)

        from vllm.multimodal.inputs import (
            MultiModalFieldElem,
            MultiModalKwargsItem,
            MultiModalKwargsItems,
            PlaceholderRange,
        )

        kwargs: dict[str, list[Any]] = {}
        hashes: dict[str, list[str]] = {}
        placeholders: dict[str, list[Any]] = {}
        for item in prompt.items:
            if item.fields is None:
                raise ValueError(f"item {item.hash} has no fields; resolve it first")
            m = item.modality.value
            kwargs.setdefault(m, []).append(
                MultiModalKwargsItem(
                    {
                        name: MultiModalFieldElem(data=f.data, field=_vllm_field(f))
                        for name, f in item.fields.items()
                    }
                )
            )
            hashes.setdefault(m, []).append(item.hash)
            ph = item.placeholder
            is_embed = None
            if ph.is_embed is not None and not all(ph.is_embed):
                is_embed = torch.tensor(ph.is_embed, dtype=torch.bool)
            placeholders.setdefault(m, []).append(
                PlaceholderRange(offset=ph.offset, length=ph.length, is_embed=is_embed)
            )
        return mm_input(
            prompt_token_ids=token_ids,
            mm_kwargs=MultiModalKwargsItems(kwargs),
            mm_hashes=hashes,
            mm_placeholders=placeholders,
        )


class SamplingToParams:
    """`vlm.types.Sampling` → vLLM `SamplingParams` (DELTA output, n=1)."""

    _PASSTHROUGH = (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "max_tokens",
        "min_tokens",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "skip_special_tokens",
    )

    def __init__(self, defaults: Mapping[str, Any] | None = None) -> None:
        # e.g. model_config.get_diff_sampling_param(): the generation config's defaults.
        self._defaults = {k: v for k, v in (defaults or {}).items() if k in self._PASSTHROUGH}

    def __call__(self, sampling: Sampling) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        kwargs: dict[str, Any] = dict(self._defaults)
        for name in self._PASSTHROUGH:
            value = getattr(sampling, name)
            if value is not None:
                kwargs[name] = value
        kwargs.update(
            n=1,
            stop=list(sampling.stop),
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            detokenize=True,
        )
        try:
            return SamplingParams(**kwargs)
        except Exception as e:  # noqa: BLE001 - VLLMValidationError is not a ValueError
            raise translate_sampling_error(e) from e


# ------------------------------------------------------------------------------- vLLM → domain


def _layout_of(field: Any) -> tuple[FieldLayout, int]:
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFlatField,
        MultiModalSharedField,
    )

    if isinstance(field, MultiModalBatchedField):
        return FieldLayout.BATCHED, 0
    if isinstance(field, MultiModalFlatField):
        return FieldLayout.FLAT, int(field.dim)
    if isinstance(field, MultiModalSharedField):
        return FieldLayout.SHARED, 0
    raise TypeError(f"unknown vLLM field type {type(field).__name__}")


def fields_from_kwargs_item(kwargs_item: Mapping[str, Any]) -> dict[str, ItemField]:
    """One `MultiModalKwargsItem` → {name: ItemField} (each elem's data is already per item)."""
    fields: dict[str, ItemField] = {}
    for name, elem in kwargs_item.items():
        if not isinstance(elem.data, torch.Tensor):
            raise TypeError(f"field {name!r} holds {type(elem.data).__name__}, not a tensor")
        layout, flat_dim = _layout_of(elem.field)
        fields[name] = ItemField(
            data=elem.data.contiguous(),
            layout=layout,
            flat_dim=flat_dim,
            keep_on_cpu=bool(elem.field.keep_on_cpu),
        )
    return fields


def placeholder_from_range(rng: Any) -> Placeholder:
    is_embed = None
    if rng.is_embed is not None:
        is_embed = tuple(bool(x) for x in rng.is_embed.tolist())
    return Placeholder(offset=int(rng.offset), length=int(rng.length), is_embed=is_embed)


def items_from_engine_input(engine_input: Mapping[str, Any]) -> tuple[Item, ...]:
    """A `MultiModalInput` dict → Items sorted by placeholder offset (prompt order).

    An item whose kwargs are None (vLLM's processor cache had it) becomes hash-only.
    """
    items: list[Item] = []
    mm_kwargs = engine_input.get("mm_kwargs") or {}
    for modality_name, ranges in (engine_input.get("mm_placeholders") or {}).items():
        modality = Modality(modality_name)
        hashes = engine_input["mm_hashes"][modality_name]
        kwargs_items = mm_kwargs.get(modality_name) or [None] * len(ranges)
        for rng, h, kw in zip(ranges, hashes, kwargs_items, strict=True):
            items.append(
                Item(
                    modality=modality,
                    hash=h,
                    placeholder=placeholder_from_range(rng),
                    fields=None if kw is None else fields_from_kwargs_item(kw),
                )
            )
    items.sort(key=lambda it: it.placeholder.offset)
    return tuple(items)
