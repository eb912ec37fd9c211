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
errors translated by `vlm.vllm_errors` into InvalidArgument naming `sampling.<field>`.

The per-field and per-range conversions both ways live in `vlm.vllm_mm`, shared with the
preprocessor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


from vlm import vllm_errors
from vlm.errors import Internal
from vlm.types import OPTIONAL_SAMPLING_FIELDS, Prompt, Sampling
from vlm.vllm_mm import placeholder_range, vllm_field

# ------------------------------------------------------------------------------- domain → vLLM


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
                        name: MultiModalFieldElem(data=f.data, field=vllm_field(f))
                        for name, f in item.fields.items()
                    }
                )
            )
            hashes.setdefault(m, []).append(item.hash)
            placeholders.setdefault(m, []).append(placeholder_range(item.placeholder))
        return mm_input(
            prompt_token_ids=token_ids,
            mm_kwargs=MultiModalKwargsItems(kwargs),
            mm_hashes=hashes,
            mm_placeholders=placeholders,
        )


class SamplingToParams:
    """`vlm.types.Sampling` → vLLM `SamplingParams` (DELTA output, n=1)."""

    _PASSTHROUGH = OPTIONAL_SAMPLING_FIELDS

    def __init__(
        self, defaults: Mapping[str, Any] | None = None, *, max_model_len: int | None = None
    ) -> None:
        # e.g. model_config.get_diff_sampling_param(): the generation config's defaults.
        self._defaults = {k: v for k, v in (defaults or {}).items() if k in self._PASSTHROUGH}
        self._max_model_len = max_model_len

    def __call__(self, sampling: Sampling, prompt_len: int | None = None) -> Any:
        """Without max_tokens (here or in the generation config), generation may run to the
        end of the context, as vLLM's OpenAI server does (not SamplingParams' 16)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        kwargs: dict[str, Any] = dict(self._defaults)
        if "max_tokens" not in kwargs and self._max_model_len is not None and prompt_len is not None:
            kwargs["max_tokens"] = max(1, self._max_model_len - prompt_len)
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
            err = vllm_errors.translate(e, vllm_errors.SAMPLING)
            raise (err or Internal(f"sampling parameters failed: {type(e).__name__}")) from e
