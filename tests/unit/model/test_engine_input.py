from __future__ import annotations

import torch

from model_svc.engine_input import PromptToEngineInput, SamplingToParams
from vlm.digest import item_digest
from vlm.vllm_mm import items_from_engine_input
from vlm.types import FieldLayout, Fingerprint, Item, ItemField, Modality, Placeholder, Prompt, Sampling

FP = Fingerprint("m", "auto", "h", "float32")


def qwen_like(h: str, rows: int, offset: int, modality=Modality.IMAGE, is_embed=None) -> Item:
    return Item(
        modality,
        h,
        Placeholder(offset, rows // 4 if is_embed is None else len(is_embed), is_embed),
        {
            "pixel_values": ItemField(torch.arange(rows * 6, dtype=torch.float32).reshape(rows, 6), FieldLayout.FLAT),
            "image_grid_thw": ItemField(torch.tensor([1, 2, rows // 2]), FieldLayout.BATCHED, keep_on_cpu=True),
            "shared": ItemField(torch.ones(2), FieldLayout.SHARED),
            "cols": ItemField(torch.zeros(2, rows), FieldLayout.FLAT, flat_dim=1),
        },
    )


def test_builds_vllm_mm_input():
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFlatField,
        MultiModalKwargsItems,
        MultiModalSharedField,
    )

    items = (
        qwen_like("a", 8, 1),
        qwen_like("v", 4, 4, modality=Modality.VIDEO),
        qwen_like("b", 4, 6, is_embed=(True, False, True)),
    )
    prompt = Prompt(FP, tuple(range(12)), items)
    out = PromptToEngineInput()(prompt)
    assert out["type"] == "multimodal"
    assert out["prompt_token_ids"] == list(range(12))
    assert out["mm_hashes"] == {"image": ["a", "b"], "video": ["v"]}
    kw = out["mm_kwargs"]
    assert isinstance(kw, MultiModalKwargsItems)
    first = kw["image"][0]
    assert isinstance(first["pixel_values"].field, MultiModalFlatField)
    assert first["pixel_values"].field.slices == [slice(0, 8)] and first["pixel_values"].field.dim == 0
    assert first["cols"].field.slices == [(slice(None), slice(0, 8))] and first["cols"].field.dim == 1
    assert isinstance(first["image_grid_thw"].field, MultiModalBatchedField)
    assert first["image_grid_thw"].field.keep_on_cpu
    assert isinstance(first["shared"].field, MultiModalSharedField) and first["shared"].field.batch_size == 1
    assert first["pixel_values"].data is items[0].fields["pixel_values"].data  # no copy
    ph_a, ph_b = out["mm_placeholders"]["image"]
    assert (ph_a.offset, ph_a.length, ph_a.is_embed) == (1, 2, None)
    assert ph_b.is_embed.dtype == torch.bool and ph_b.is_embed.tolist() == [True, False, True]
    assert ph_b.get_num_embeds() == 2
    # Round trip back to domain items.
    back = items_from_engine_input(out)
    # Hashes come back as the digest of the fields, equal to the digest of the originals.
    assert [(i.modality, i.hash, i.placeholder) for i in back] == [
        (i.modality, item_digest(i.modality, i.fields), i.placeholder) for i in items
    ]
    for orig, got in zip(items, back, strict=True):
        for name, f in orig.fields.items():
            g = got.fields[name]
            assert (g.layout, g.flat_dim, g.keep_on_cpu) == (f.layout, f.flat_dim, f.keep_on_cpu)
            assert torch.equal(g.data, f.data)


def test_items_of_different_requests_batch_in_vllm():
    from vllm.multimodal.utils import group_and_batch_mm_items

    a = PromptToEngineInput()(Prompt(FP, tuple(range(4)), (qwen_like("a", 8, 1),)))
    b = PromptToEngineInput()(Prompt(FP, tuple(range(4)), (qwen_like("b", 4, 1),)))
    groups = list(group_and_batch_mm_items([a["mm_kwargs"]["image"][0], b["mm_kwargs"]["image"][0]]))
    assert len(groups) == 1
    n, batch = groups[0]
    assert n == 2
    assert batch["pixel_values"].shape == (12, 6)
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]
    assert batch["cols"].shape == (2, 12)


def test_text_only_prompt_is_a_tokens_input():
    out = PromptToEngineInput()(Prompt(FP, (1, 2, 3)))
    assert out == {"type": "token", "prompt_token_ids": [1, 2, 3]}


def test_sampling_to_params():
    from vllm.sampling_params import RequestOutputKind

    conv = SamplingToParams({"temperature": 0.7, "top_p": 0.9, "unrelated": 1})
    p = conv(Sampling(max_tokens=5, stop=("x",), stop_token_ids=(3,), seed=7, logprobs=2))
    assert p.output_kind == RequestOutputKind.DELTA and p.n == 1
    assert (p.temperature, p.top_p, p.max_tokens, p.seed, p.logprobs) == (0.7, 0.9, 5, 7, 2)
    assert p.stop == ["x"] and p.stop_token_ids == [3]
    p = conv(Sampling(temperature=0.0, ignore_eos=True))
    assert p.temperature == 0.0 and p.ignore_eos


def test_max_tokens_defaults_to_the_rest_of_the_context():
    conv = SamplingToParams(max_model_len=100)
    assert conv(Sampling(), prompt_len=30).max_tokens == 70  # as vLLM's OpenAI server does
    assert conv(Sampling(max_tokens=5), prompt_len=30).max_tokens == 5
    # The generation config's own max_tokens wins over the context default.
    assert SamplingToParams({"max_tokens": 12}, max_model_len=100)(Sampling(), prompt_len=30).max_tokens == 12
