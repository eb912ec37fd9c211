"""The model profile: every fact about the served model that either service checks or reports.

One `ModelProfile` is built per process from vLLM's own config and renderer
(`vlm.vllm_profile.build_profile`), the same way on both sides, so the preprocessor and the
model service agree by construction: `GetModelInfo` is `profile.model_info()` on both, the
preprocessor's placeholder-count checks and the model service's prompt validation read the same
placeholder tokens, limits and field specs. This module is plain frozen data (no vLLM, no
protobuf); the profile pickles, so a preprocessor worker can hand it to its parent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from vlm.types import FieldLayout, Fingerprint, ModalityInfo, Modality, ModelInfo


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
class SizeSource:
    """Where an item's own fields tell the size of the media they came from.

    `kind` "hw_values": `field` holds (height, width) (LLaVA-OneVision's `image_sizes`);
    "hw_dims": the last two dims of `field` are (height, width) (Mistral 3's `pixel_values`),
    and for videos dim 0 counts the frames. Chosen at start-up only if a stand-in media of that
    size, run through vLLM's processor, reproduces the probes' fields and placeholders exactly
    (`vlm.vllm_profile`); the model service then checks every item against such a reference.
    """

    field: str
    kind: str  # "hw_values" | "hw_dims"


@dataclass(frozen=True)
class ModalityProfile:
    modality: Modality
    #: Token IDs found at the embedding positions of an expanded item (e.g. `<image>`,
    #: Pixtral's `[IMG]`, Gemma 3's `<image_soft_token>`).
    placeholder_token_ids: frozenset[int]
    #: What a prompt writes for one item (e.g. "<image>", "<start_of_image>").
    placeholder_text: str
    #: vLLM's per-prompt item limit (--limit-mm-per-prompt).
    max_items: int
    #: The one token of `placeholder_text` that occurs once per item in an unexpanded prompt
    #: (counted against the items given); None when the text has no such token.
    count_token_id: int | None = None
    #: Field expectations; None when they could not be derived (only generic checks then).
    fields: Mapping[str, FieldSpec] | None = None
    #: Embed count every item has (fixed-shape models), else None.
    fixed_embed_count: int | None = None
    #: Grid field ("image_grid_thw") and prod(grid) / embeds (merge_size²), for grid models.
    grid_field: str | None = None
    grid_per_embed: int | None = None
    #: Exact layout check: every item is compared with vLLM's processor run on a stand-in
    #: media of the size its fields give (all field shapes, small integer fields, placeholder
    #: length and is_embed). None where no field gives the size.
    size_source: SizeSource | None = None
    #: Count check where the size is not recoverable (Idefics3: the raw size is gone, only the
    #: tile count is left): (field, k) with embeds == k x rows of the field (dim 0).
    embeds_per_row: tuple[str, int] | None = None
    #: (count field, rows field) pairs: the 0-dim integer count field equals the row count of
    #: the other (Idefics3's and Gemma 3's `num_patches` against `pixel_values`).
    row_counts: tuple[tuple[str, str], ...] = ()

    @property
    def layout_check(self) -> str:
        """How the item/placeholder fit is checked: reference, grid, per_row, fixed or none."""
        if self.size_source is not None:
            return "reference"
        if self.grid_field is not None:
            return "grid"
        if self.embeds_per_row is not None:
            return "per_row"
        if self.fixed_embed_count is not None:
            return "fixed"
        return "none"

    def info(self) -> ModalityInfo:
        return ModalityInfo(
            modality=self.modality,
            placeholder_token_ids=tuple(sorted(self.placeholder_token_ids)),
            placeholder_text=self.placeholder_text,
            max_items_per_prompt=self.max_items,
        )


@dataclass(frozen=True)
class ModelProfile:
    #: Model files, model_impl, vLLM release and the dtype float features travel in.
    fingerprint: Fingerprint
    vocab_size: int
    max_model_len: int
    #: The engine's max logprobs per token (-1: unlimited).
    max_logprobs: int
    eos_token_ids: tuple[int, ...] = ()
    modalities: Mapping[Modality, ModalityProfile] = field(default_factory=dict)

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.fingerprint.model_id,
            fingerprint=self.fingerprint,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            modalities=tuple(self.modalities[m].info() for m in Modality if m in self.modalities),
        )
