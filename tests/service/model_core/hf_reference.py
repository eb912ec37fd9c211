"""Greedy reference generations with Hugging Face transformers, from a domain `Prompt`.

The expanded token IDs go to HF as is; each feature field is combined across the prompt's
items the way vLLM batches it (batched → stack, flat → concatenate along flat_dim, shared →
the one tensor), which is also what HF's processor returns for the models tested here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import lru_cache

import torch

from vlm.types import FieldLayout, Prompt


def hf_model_inputs(prompt: Prompt) -> dict[str, torch.Tensor]:
    by_name: dict[str, list] = {}
    for item in prompt.items:
        assert item.fields is not None
        for name, f in item.fields.items():
            by_name.setdefault(name, []).append(f)
    out: dict[str, torch.Tensor] = {}
    for name, fs in by_name.items():
        layout = fs[0].layout
        if layout is FieldLayout.BATCHED:
            out[name] = torch.stack([f.data for f in fs])
        elif layout is FieldLayout.FLAT:
            out[name] = torch.cat([f.data for f in fs], dim=fs[0].flat_dim)
        else:
            out[name] = fs[0].data
    ids = torch.tensor([list(prompt.token_ids)], dtype=torch.long)
    out["input_ids"] = ids
    out["attention_mask"] = torch.ones_like(ids)
    return out


@lru_cache(maxsize=4)
def load_hf_model(model_dir: str):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_greedy(model_dir: str, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """Greedy tokens, EOS ignored (generation runs for exactly max_new_tokens)."""
    return hf_generate(model_dir, hf_model_inputs(prompt), max_new_tokens)


def hf_generate(model_dir: str, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> list[int]:
    """HF greedy generation of exactly `max_new_tokens` (EOS ignored) from model inputs."""
    model = load_hf_model(model_dir)
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id = None
    gc.do_sample = False
    gc.max_new_tokens = max_new_tokens
    gc.min_new_tokens = None
    if gc.pad_token_id is None:
        gc.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=gc)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_greedy_from_media(
    model_dir: str, text: str, max_new_tokens: int, *, images=None, videos=None
) -> tuple[list[int], list[int]]:
    """Independent reference: HF's own processor on (text, media), then HF greedy generation.

    Returns (expanded prompt token IDs, generated token IDs).
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    kwargs = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    inputs = processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)
    inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    return inputs["input_ids"][0].tolist(), hf_generate(model_dir, inputs, max_new_tokens)
