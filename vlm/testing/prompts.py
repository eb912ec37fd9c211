"""Build `vlm.types.Prompt`s in-process with vLLM's own renderer (tests only).

The model service's tests need preprocessed prompts without importing `preprocessor_svc`. This
runs vLLM's renderer (the same multimodal processor vLLM's frontend runs) on token IDs plus
media, and converts its `MultiModalInput` (`mm_kwargs`, `mm_hashes`, `mm_placeholders`) into
domain `Item`s:

    renderer = make_renderer(vllm_config)           # e.g. engine.vllm_config
    prompt = render_prompt(renderer, token_ids, {"image": [img]}, fingerprint)

`vlm.vllm_mm.items_from_engine_input` (shared with the preprocessor) does the conversion. Build the renderer from an engine config with
`mm_processor_cache_gb=0`: with vLLM's processor cache on, a repeated item comes back without
data (vLLM assumes its engine holds it) and becomes a hash-only item here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from vlm.vllm_mm import items_from_engine_input
from vlm.types import Fingerprint, Prompt

__all__ = ["items_from_engine_input", "make_renderer", "prompt_from_engine_input", "render_prompt"]


def make_renderer(vllm_config: Any) -> Any:
    """vLLM's renderer (an `HfRenderer` for HF models) for a `VllmConfig`; no engine needed."""
    from vllm.renderers.registry import renderer_from_config

    return renderer_from_config(vllm_config)


def prompt_from_engine_input(
    engine_input: Mapping[str, Any], fingerprint: Fingerprint, *, prompt_text: str | None = None
) -> Prompt:
    return Prompt(
        fingerprint=fingerprint,
        token_ids=tuple(int(t) for t in engine_input["prompt_token_ids"]),
        items=items_from_engine_input(engine_input),
        prompt_text=prompt_text,
    )


def render_prompt(
    renderer: Any,
    token_ids: Sequence[int],
    mm_data: Mapping[str, Any],
    fingerprint: Fingerprint,
    *,
    mm_processor_kwargs: Mapping[str, Any] | None = None,
) -> Prompt:
    """Run vLLM's multimodal processing on token IDs (one placeholder token per item) + media.

    `mm_data` is vLLM's `multi_modal_data`, e.g. {"image": [pil, pil]} or {"video": [frames]}.
    """
    prompt: dict[str, Any] = {"prompt_token_ids": list(token_ids)}
    if mm_data:
        prompt["multi_modal_data"] = dict(mm_data)
    if mm_processor_kwargs:
        prompt["mm_processor_kwargs"] = dict(mm_processor_kwargs)
    engine_input = renderer.process_for_engine(prompt, time.time())
    return prompt_from_engine_input(engine_input, fingerprint)
