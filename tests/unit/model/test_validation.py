"""Every validation rule, by exception class and field path (hand-made model spec, no engine)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_svc.engine_input import SamplingToParams
from model_svc.config import Limits
from model_svc.validation import PromptValidator
from vlm.digest import item_digest
from vlm.profile import FieldSpec, ModalityProfile, ModelProfile
from vlm.errors import InvalidArgument, LimitExceeded, ModelMismatch, PromptTooLong
from vlm.types import (
    FieldLayout,
    Fingerprint,
    Item,
    ItemField,
    Modality,
    Placeholder,
    Prompt,
    Sampling,
)

FP = Fingerprint("tiny", "auto", "abc", "float32")
IMG, VID, BREAK = 9, 8, 7  # placeholder tokens; BREAK is a structural (non-embed) token

SPEC = ModelProfile(
    fingerprint=FP,
    vocab_size=100,
    max_model_len=64,
    max_logprobs=5,
    modalities={
        Modality.IMAGE: ModalityProfile(
            modality=Modality.IMAGE,
            placeholder_token_ids=frozenset({IMG}),
            placeholder_text="<image>",
            max_items=2,
            fields={
                "pixel_values": FieldSpec("pixel_values", FieldLayout.BATCHED, torch.float32, 0, False, (3, 4, 4)),
            },
            fixed_embed_count=4,
        ),
        Modality.VIDEO: ModalityProfile(
            modality=Modality.VIDEO,
            placeholder_token_ids=frozenset({VID}),
            placeholder_text="<video>",
            max_items=1,
            fields={
                "pixel_values_videos": FieldSpec(
                    "pixel_values_videos", FieldLayout.FLAT, torch.float32, 0, False, (None, 12), rows_per_grid=1
                ),
                "video_grid_thw": FieldSpec("video_grid_thw", FieldLayout.BATCHED, torch.int64, 0, True, (3,)),
            },
            grid_field="video_grid_thw",
            grid_per_embed=4,
        ),
    },
)


def image_item(
    offset: int, *, h: str | None = None, seed: float = 0.0, length: int = 4, is_embed=None, fields=True
) -> Item:
    """An image item whose hash is the digest of its fields (unless `h` is given)."""
    f = {"pixel_values": ItemField(torch.full((3, 4, 4), float(seed)), FieldLayout.BATCHED)} if fields else None
    if h is None:
        h = item_digest(Modality.IMAGE, f) if f else "img"
    return Item(Modality.IMAGE, h, Placeholder(offset, length, is_embed), f)


def video_item(offset: int, grid=(1, 2, 4), rows=None) -> Item:
    cells = grid[0] * grid[1] * grid[2]
    fields = {
        "pixel_values_videos": ItemField(torch.zeros(rows or cells, 12), FieldLayout.FLAT, flat_dim=0),
        "video_grid_thw": ItemField(torch.tensor(grid), FieldLayout.BATCHED, keep_on_cpu=True),
    }
    return Item(Modality.VIDEO, item_digest(Modality.VIDEO, fields), Placeholder(offset, cells // 4), fields)


def prompt(tokens, items=(), fp=FP) -> Prompt:
    return Prompt(fingerprint=fp, token_ids=tuple(tokens), items=tuple(items))


# 1 2 [9 9 9 9] 3 [8 8] 4
GOOD_TOKENS = (1, 2, IMG, IMG, IMG, IMG, 3, VID, VID, 4)
GOOD = prompt(GOOD_TOKENS, [image_item(2), video_item(7)])


def check(p: Prompt, exc: type, field: str, *, limits: Limits | None = None, sampling: Sampling | None = None):
    v = PromptValidator(SPEC, limits)
    with pytest.raises(exc) as e:
        v.validate_prompt(p)
        if sampling is not None:
            v.validate_sampling(sampling, len(p.token_ids))
    assert type(e.value) is exc, e.value
    assert e.value.field == field, e.value
    return e.value


def test_valid_prompt_passes():
    v = PromptValidator(SPEC)
    v.validate_prompt(GOOD)
    v.validate_sampling(Sampling(max_tokens=10, stop_token_ids=(1,), logprobs=5), len(GOOD.token_ids))


def test_fingerprint():
    check(prompt(GOOD_TOKENS, GOOD.items, fp=Fingerprint("tiny", "auto", "other", "float32")), ModelMismatch, "prompt.fingerprint")
    check(prompt(GOOD_TOKENS, GOOD.items, fp=Fingerprint("tiny", "transformers", "abc", "float32")), ModelMismatch, "prompt.fingerprint")
    # features prepared in another dtype than the model's
    check(prompt(GOOD_TOKENS, GOOD.items, fp=Fingerprint("tiny", "auto", "abc", "bfloat16")), ModelMismatch, "prompt.fingerprint")
    # model_id is informational only
    PromptValidator(SPEC).validate_prompt(prompt(GOOD_TOKENS, GOOD.items, fp=Fingerprint("/path/x", "auto", "abc", "float32")))


def test_token_ids():
    check(prompt([]), InvalidArgument, "prompt.token_ids")
    check(prompt([1, 2, 100]), InvalidArgument, "prompt.token_ids[2]")
    check(prompt([1, -1]), InvalidArgument, "prompt.token_ids[1]")
    check(prompt([1] * 64), PromptTooLong, "prompt.token_ids")
    PromptValidator(SPEC).validate_prompt(prompt([1] * 63))


def test_max_tokens_against_max_model_len():
    check(prompt([1] * 60), PromptTooLong, "sampling.max_tokens", sampling=Sampling(max_tokens=5))
    PromptValidator(SPEC).validate_sampling(Sampling(max_tokens=4), 60)


def test_modality_and_limits():
    audio = Item(Modality.AUDIO, "a", Placeholder(2, 4), None)
    check(prompt(GOOD_TOKENS, [audio]), InvalidArgument, "prompt.items[0].modality")
    toks = [IMG] * 12
    three = [image_item(0, seed=1), image_item(4, seed=2), image_item(8, seed=3)]
    check(prompt(toks, three), LimitExceeded, "prompt.items[2]")
    one = dataclasses.replace(SPEC.modalities[Modality.IMAGE], max_items=1)
    single = dataclasses.replace(SPEC, modalities={**SPEC.modalities, Modality.IMAGE: one})
    with pytest.raises(LimitExceeded) as e:
        PromptValidator(single).validate_prompt(prompt(toks[:8], three[:2]))
    assert e.value.field == "prompt.items[1]"
    check(GOOD, LimitExceeded, "prompt.items", limits=Limits(max_feature_bytes_per_prompt=100))


def test_ranges():
    toks = [1, IMG, IMG, IMG, IMG, IMG, IMG, IMG, IMG, 2]
    a, b = image_item(1, seed=1), image_item(5, seed=2)
    check(prompt(toks, [b, a]), InvalidArgument, "prompt.items[1].placeholder.offset")  # unsorted
    check(prompt(toks, [a, image_item(4, seed=2)]), InvalidArgument, "prompt.items[1].placeholder.offset")  # overlap
    check(prompt(toks, [image_item(10)]), InvalidArgument, "prompt.items[0].placeholder.offset")
    check(prompt(toks, [image_item(1, length=0)]), InvalidArgument, "prompt.items[0].placeholder.length")
    check(prompt(toks, [image_item(8)]), InvalidArgument, "prompt.items[0].placeholder.length")  # past the end
    check(prompt(toks, [image_item(1, is_embed=(True,) * 3)]), InvalidArgument, "prompt.items[0].placeholder.is_embed")
    check(prompt(toks, [image_item(1, is_embed=(False,) * 4)]), InvalidArgument, "prompt.items[0].placeholder.is_embed")
    check(prompt(toks, [image_item(1, h="")]), InvalidArgument, "prompt.items[0].hash")


def test_placeholder_tokens():
    # A text token at an embed position.
    toks = list(GOOD_TOKENS)
    toks[4] = 5
    check(prompt(toks, GOOD.items), InvalidArgument, "prompt.token_ids[4]")
    # The other modality's placeholder token is not accepted either.
    toks = list(GOOD_TOKENS)
    toks[8] = IMG
    check(prompt(toks, GOOD.items), InvalidArgument, "prompt.token_ids[8]")
    # Non-embed positions may hold anything (e.g. [IMG_BREAK]).
    toks = [1, IMG, IMG, BREAK, IMG, IMG, 2]
    PromptValidator(SPEC).validate_prompt(prompt(toks, [image_item(1, length=5, is_embed=(True, True, False, True, True))]))
    # A placeholder token outside every range: an item is missing.
    toks = [1, IMG, IMG, IMG, IMG, IMG, 2]
    check(prompt(toks, [image_item(1)]), InvalidArgument, "prompt.token_ids[5]")


def test_embed_budget():
    toks = [IMG] * 20
    item = image_item(0, length=20, fields=False)
    check(prompt(toks, [item]), LimitExceeded, "prompt.items[0].placeholder.length",
          limits=Limits(max_embeds_per_item=16))


def _with_fields(item: Item, **fields) -> Item:
    merged = {**item.fields, **fields}
    new = {k: v for k, v in merged.items() if v is not None}
    return dataclasses.replace(item, fields=new, hash=item_digest(item.modality, new))


def test_fields():
    base = GOOD.items[0]
    pv = base.fields["pixel_values"]
    path = "prompt.items[0].fields.pixel_values"
    cases = [
        (dataclasses.replace(base, fields={}), "prompt.items[0].fields"),
        (_with_fields(base, pixel_values=None, other=pv), path),  # missing
        (_with_fields(base, extra=pv), "prompt.items[0].fields.extra"),  # unexpected
        (_with_fields(base, pixel_values=dataclasses.replace(pv, layout=FieldLayout.FLAT)), f"{path}.layout"),
        (_with_fields(base, pixel_values=dataclasses.replace(pv, keep_on_cpu=True)), f"{path}.keep_on_cpu"),
        (_with_fields(base, pixel_values=dataclasses.replace(pv, data=pv.data.half())), f"{path}.tensor.dtype"),
        (_with_fields(base, pixel_values=dataclasses.replace(pv, data=torch.zeros(3, 16))), f"{path}.tensor.shape"),
        (_with_fields(base, pixel_values=dataclasses.replace(pv, data=torch.zeros(3, 4, 5))), f"{path}.tensor.shape"),
        (_with_fields(base, pixel_values=dataclasses.replace(pv, data=torch.zeros(3, 0, 4))), f"{path}.tensor.shape"),
    ]
    for item, field in cases:
        check(prompt(GOOD_TOKENS, [item, GOOD.items[1]]), InvalidArgument, field)
    # Fixed dims are only enforced when asked to.
    loose = Limits(check_fixed_shapes=False)
    odd = _with_fields(base, pixel_values=dataclasses.replace(pv, data=torch.zeros(3, 4, 5)))
    PromptValidator(SPEC, loose).validate_prompt(prompt(GOOD_TOKENS, [odd, GOOD.items[1]]))


def test_flat_dim():
    vid = GOOD.items[1]
    pv = vid.fields["pixel_values_videos"]
    bad = _with_fields(vid, pixel_values_videos=dataclasses.replace(pv, flat_dim=1))
    check(prompt(GOOD_TOKENS, [GOOD.items[0], bad]), InvalidArgument, "prompt.items[1].fields.pixel_values_videos.flat_dim")
    # -2 on a rank-2 tensor is dim 0: accepted.
    ok = _with_fields(vid, pixel_values_videos=dataclasses.replace(pv, flat_dim=-2))
    PromptValidator(SPEC).validate_prompt(prompt(GOOD_TOKENS, [GOOD.items[0], ok]))


def test_embed_counts():
    # Fixed-shape image: always 4 embeds.
    toks = [1, IMG, IMG, IMG, IMG, IMG, 2]
    check(prompt(toks, [image_item(1, length=5)]), InvalidArgument, "prompt.items[0].placeholder.length")
    toks = [1, IMG, IMG, BREAK, IMG, 2]
    check(prompt(toks, [image_item(1, length=4, is_embed=(True, True, False, True))]), InvalidArgument,
          "prompt.items[0].placeholder.is_embed")
    # Grid model: embeds = prod(grid) / 4, rows = prod(grid).
    toks = [1, VID, VID, VID, 2]
    check(prompt(toks, [dataclasses.replace(video_item(1), placeholder=Placeholder(1, 3))]), InvalidArgument,
          "prompt.items[0].placeholder.length")
    check(prompt([1, VID, VID, 2], [video_item(1, rows=7)]), InvalidArgument,
          "prompt.items[0].fields.pixel_values_videos.tensor.shape")
    zero_grid = dataclasses.replace(video_item(1, grid=(1, 0, 4), rows=8), placeholder=Placeholder(1, 2))
    check(prompt([1, VID, VID, 2], [zero_grid]), InvalidArgument,
          "prompt.items[0].fields.video_grid_thw.tensor")
    PromptValidator(SPEC).validate_prompt(prompt([1] + [VID] * 4 + [2], [video_item(1, grid=(2, 2, 4))]))


def test_resolved_hash_only_items_are_checked_too():
    v = PromptValidator(SPEC)
    toks = [1, IMG, IMG, IMG, IMG, IMG, 2]
    v.validate_prompt(prompt(toks, [image_item(1, length=5, fields=False)]))  # no fields to check yet
    with pytest.raises(InvalidArgument) as e:
        v.validate_resolved([image_item(1, length=5)])  # the store's fields give 4 embeds, not 5
    assert e.value.field == "prompt.items[0].placeholder.length"


def test_sampling_checks():
    p = GOOD
    check(p, InvalidArgument, "sampling.stop_token_ids[1]", sampling=Sampling(stop_token_ids=(1, 100)))
    check(p, InvalidArgument, "sampling.logprobs", sampling=Sampling(logprobs=6))


@pytest.mark.parametrize(
    "sampling, field",
    [
        (Sampling(temperature=-0.5), "sampling.temperature"),
        (Sampling(temperature=float("nan")), "sampling.temperature"),
        (Sampling(top_p=0.0), "sampling.top_p"),
        (Sampling(top_p=1.5), "sampling.top_p"),
        (Sampling(top_k=-2), "sampling.top_k"),
        (Sampling(min_p=2.0), "sampling.min_p"),
        (Sampling(max_tokens=0), "sampling.max_tokens"),
        (Sampling(min_tokens=-1), "sampling.min_tokens"),
        (Sampling(min_tokens=5, max_tokens=2), "sampling.min_tokens"),
        (Sampling(repetition_penalty=0.0), "sampling.repetition_penalty"),
        (Sampling(presence_penalty=3.0), "sampling.presence_penalty"),
        (Sampling(frequency_penalty=-3.0), "sampling.frequency_penalty"),
        (Sampling(logprobs=-5), "sampling.logprobs"),
        (Sampling(stop=("",)), "sampling.stop"),
    ],
)
def test_vllm_sampling_errors_are_translated(sampling, field):
    with pytest.raises(InvalidArgument) as e:
        SamplingToParams()(sampling)
    assert e.value.field == field, e.value


def test_hash_must_be_the_digest_of_the_fields():
    a, b = image_item(1, seed=1), image_item(1, seed=2)
    toks = [1, IMG, IMG, IMG, IMG, 2]
    PromptValidator(SPEC).validate_prompt(prompt(toks, [a]))
    # B's features under A's hash: the poisoning attempt is refused, naming the hash.
    forged = dataclasses.replace(b, hash=a.hash)
    err = check(prompt(toks, [forged]), InvalidArgument, "prompt.items[0].hash")
    assert item_digest(Modality.IMAGE, b.fields) in str(err)
    # A single changed value, dtype or layout changes the digest.
    pv = a.fields["pixel_values"].data.clone()
    pv[0, 0, 0] += 1
    changed = dataclasses.replace(a, fields={"pixel_values": ItemField(pv, FieldLayout.BATCHED)})
    check(prompt(toks, [changed]), InvalidArgument, "prompt.items[0].hash")
    assert item_digest(Modality.IMAGE, a.fields) != item_digest(
        Modality.IMAGE, {"pixel_values": ItemField(a.fields["pixel_values"].data, FieldLayout.SHARED)})
    assert item_digest(Modality.IMAGE, a.fields) != item_digest(Modality.VIDEO, a.fields)


# ---------------------------------------------------------------------------------------------
# Features vs. placeholder: the reference layout, per-row counts, count fields
# ---------------------------------------------------------------------------------------------

from vlm.profile import SizeSource  # noqa: E402
from vlm.vllm_layout import MediaSize, Reference  # noqa: E402

def image_profile(**image: object) -> ModelProfile:
    """SPEC's model with one image modality made of `image` (fields and layout relations)."""
    return dataclasses.replace(SPEC, modalities={Modality.IMAGE: ModalityProfile(
        modality=Modality.IMAGE, placeholder_token_ids=frozenset({IMG}), placeholder_text="<image>",
        max_items=2, **image,
    )})


#: Variable-size images: (h, w) in `image_sizes`, patch stacks of h*w/16 rows; a reference
#: layout with one structural token after every 2 embeds (as Pixtral's row breaks).
VAR = image_profile(
    fields={
        "image_sizes": FieldSpec("image_sizes", FieldLayout.BATCHED, torch.int64, 0, False, (2,)),
        "pixel_values": FieldSpec("pixel_values", FieldLayout.BATCHED, torch.float32, 0, False, (None, 3, 4, 4)),
    },
    size_source=SizeSource("image_sizes", "hw_values"),
)


def reference_of(modality: Modality, size: MediaSize) -> Reference:
    """What a processor would say: h*w/16 patches, embeds = patches * 2, a break after every 2."""
    if size.width % 4 or size.height % 4:
        raise ValueError("sizes must be multiples of 4")
    patches = size.width * size.height // 16
    mask = (True, True, False) * patches
    return Reference({"image_sizes": (2,), "pixel_values": (patches, 3, 4, 4)},
                     {"image_sizes": (size.height, size.width)}, len(mask), mask)


def var_item(offset: int, hw=(4, 8), patches=None, mask=None) -> Item:
    patches = patches if patches is not None else hw[0] * hw[1] // 16
    f = {"image_sizes": ItemField(torch.tensor(hw), FieldLayout.BATCHED),
         "pixel_values": ItemField(torch.zeros(patches, 3, 4, 4), FieldLayout.BATCHED)}
    mask = mask if mask is not None else (True, True, False) * (hw[0] * hw[1] // 16)
    return Item(Modality.IMAGE, item_digest(Modality.IMAGE, f), Placeholder(offset, len(mask), mask), f)


def var_prompt(item: Item) -> Prompt:
    tokens = [1] * item.placeholder.offset + [IMG if e else BREAK for e in item.placeholder.is_embed] + [2]
    return prompt(tokens, [item])


def test_reference_layout_accepts_the_exact_fit() -> None:
    seen = []
    refs = lambda m, s: (seen.append(s), reference_of(m, s))[1]  # noqa: E731
    PromptValidator(VAR, references=refs).validate_prompt(var_prompt(var_item(1)))
    assert seen == [MediaSize(width=8, height=4)]


@pytest.mark.parametrize("item, field, words", [
    # another size's features in this range: the size says 2 patches → 6 positions, not 3
    (var_item(1, hw=(4, 8), mask=(True, True, False)), "prompt.items[0].placeholder.length", "8x4 image takes 6"),
    # same length, embeds moved: only the exact mask tells
    (var_item(1, hw=(4, 8), mask=(True, False, True, True, True, False)), "prompt.items[0].placeholder.is_embed", "takes 6"),
    # the stack has a patch too few for the size it claims (the vision tower would fail)
    (var_item(1, hw=(4, 8), patches=1), "prompt.items[0].fields.pixel_values.tensor.shape", "[1, 3, 4, 4]"),
])
def test_reference_layout_refuses_what_does_not_fit(item, field, words) -> None:
    with pytest.raises(InvalidArgument) as e:
        PromptValidator(VAR, references=reference_of).validate_prompt(var_prompt(item))
    assert e.value.field == field and words in str(e.value), e.value


def test_reference_size_is_bounded_and_checked() -> None:
    v = PromptValidator(VAR, Limits(max_reference_pixels=1000), references=reference_of)
    with pytest.raises(LimitExceeded) as e:  # a claimed 4000x4000 image: no stand-in is built
        v.validate_prompt(var_prompt(var_item(1, hw=(4000, 4000), patches=1, mask=(True, True, False))))
    assert e.value.field == "prompt.items[0].fields.image_sizes.tensor"
    with pytest.raises(InvalidArgument) as e:
        v.validate_prompt(var_prompt(var_item(1, hw=(0, 8), patches=1, mask=(True, True, False))))
    assert e.value.field == "prompt.items[0].fields.image_sizes.tensor"
    with pytest.raises(InvalidArgument) as e:  # the processor's own refusal, translated once
        v.validate_prompt(var_prompt(var_item(1, hw=(5, 8), patches=2)))
    assert e.value.field == "prompt.items[0].fields.image_sizes.tensor" and "ValueError" in str(e.value)


def test_reference_layout_is_off_without_a_processor_or_when_not_strict() -> None:
    bad = var_prompt(var_item(1, hw=(4, 8), mask=(True, True, False)))
    PromptValidator(VAR).validate_prompt(bad)  # no references: the generic checks only
    PromptValidator(VAR, Limits(check_fixed_shapes=False), references=reference_of).validate_prompt(bad)


TILES = image_profile(
    fields={
        "num_patches": FieldSpec("num_patches", FieldLayout.BATCHED, torch.int64, 0, True, ()),
        "pixel_values": FieldSpec("pixel_values", FieldLayout.FLAT, torch.float32, 0, False, (None, 3, 4, 4)),
    },
    embeds_per_row=("pixel_values", 2),
    row_counts=(("num_patches", "pixel_values"),),
)


def tile_item(tiles: int, embeds: int, count: int | None = None) -> Item:
    f = {"num_patches": ItemField(torch.tensor(tiles if count is None else count), FieldLayout.BATCHED, keep_on_cpu=True),
         "pixel_values": ItemField(torch.zeros(tiles, 3, 4, 4), FieldLayout.FLAT)}
    return Item(Modality.IMAGE, item_digest(Modality.IMAGE, f), Placeholder(1, embeds), f)


def test_per_row_count_and_count_fields() -> None:
    v = PromptValidator(TILES)
    v.validate_prompt(prompt([1] + [IMG] * 6 + [2], [tile_item(3, 6)]))
    with pytest.raises(InvalidArgument) as e:  # 3 tiles take 6 embeddings, not 4
        v.validate_prompt(prompt([1] + [IMG] * 4 + [2], [tile_item(3, 4)]))
    assert e.value.field == "prompt.items[0].placeholder.length"
    with pytest.raises(InvalidArgument) as e:  # num_patches says 2, the tiles are 3
        v.validate_prompt(prompt([1] + [IMG] * 6 + [2], [tile_item(3, 6, count=2)]))
    assert e.value.field == "prompt.items[0].fields.num_patches.tensor"
