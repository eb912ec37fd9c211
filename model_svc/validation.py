"""Validation of preprocessed prompts and sampling parameters, before anything reaches vLLM.

vLLM trusts `mm_input` prompts: a range one token short, a range past the end of the prompt or
a text token inside a range complete silently with wrong output, and a malformed feature tensor
can crash the engine core (taking every in-flight request down). So every request is checked
here first, and each failure raises a `vlm.errors` exception naming the request field at fault
(a dotted path into the wire request, e.g. "prompt.items[1].placeholder.length").

What is checked (`PromptValidator`):

* `prompt.fingerprint` — same model files, model_impl, vLLM release and feature dtype as served
  (`ModelMismatch`).
* `prompt.token_ids` — not empty, every ID in [0, vocab_size); prompt shorter than max_model_len
  (`PromptTooLong`); a placeholder token of a served modality outside every item's range is
  refused (vLLM would embed it as text: the prompt lost an item).
* `prompt.items[i]` — modality served; per-prompt count within the limit (`LimitExceeded`, the
  first item over the limit is named); ranges sorted by offset, non-overlapping, length >= 1,
  inside the prompt; `is_embed` (when given) as long as the range with at least one True; every
  embed position holds one of the modality's placeholder token IDs (non-embed positions may hold
  anything); embed count within vLLM's encoder-cache budget (`LimitExceeded`).
* `prompt.items[i].hash` — for an item sent with fields, the BLAKE3 digest of those fields
  (`vlm.digest`): the hash keys the feature store and vLLM's caches, so it is verified, never
  trusted; a hash-only item resolves only to an entry stored after that check.
* `prompt.items[i].fields` (items sent with fields, and hash-only items once resolved) — exactly
  the field names the model's processor produces for the modality, each with the processor's
  layout (batched / flat + flat_dim / shared), keep_on_cpu, dtype, rank and non-empty shape;
  dimensions that are the same for every input size are enforced exactly (e.g. LLaVA's
  3x336x336 pixels, Qwen2-VL's 1176-wide patch rows).
* features vs. placeholder (`ModalityProfile.layout_check`), so that no item's features land in
  another item's range shape: (a) "reference" — where the fields give the media's size
  (LLaVA, LLaVA-OneVision image and video, Mistral 3, Gemma 3), vLLM's own processor run on a
  blank stand-in of that size (`vlm.vllm_layout`, memoised per size) gives every field's shape,
  the small integer fields and the exact placeholder (length and is_embed), and the item must
  match all of them; (b) "grid" — `*_grid_thw` fields (Qwen2-VL family): embeds = prod(grid) /
  merge², and flat patch rows = prod(grid) x k; (c) "per_row" — where only a tile count is left
  (Idefics3): embeds = k x tiles; (d) "fixed" embed counts. Count fields equal the rows they
  count (`num_patches`). Which one a model gets is chosen at start-up by reproducing the probes;
  "none" is logged as an error and exported (`vlm_model_profile_layout_check`).
* sampling — vLLM's own `SamplingParams` checks (in `engine_input.SamplingToParams`, translated
  by `vlm.vllm_errors`), plus at most vLLM's `VLLM_MAX_STOP_STRINGS` stop strings (the bound
  vLLM's OpenAI server puts on `stop`; `SamplingParams` itself takes any number), stop token IDs
  within the vocabulary, logprobs <= the engine's max_logprobs, and prompt + max_tokens <=
  max_model_len (`PromptTooLong` naming sampling.max_tokens).

Every expectation comes from the `vlm.profile.ModelProfile` (derived once at start-up by
`vlm.vllm_profile.build_profile`, the same code the preprocessor runs) and this service's
`config.Limits`; nothing is derived per request.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from model_svc.config import Limits
from vlm.digest import item_digest
from vlm.errors import InvalidArgument, LimitExceeded, ModelMismatch, PromptTooLong
from vlm.profile import FieldSpec, ModalityProfile, ModelProfile
from vlm.types import FieldLayout, Item, ItemField, Modality, Prompt, Sampling
from vlm.vllm_layout import MediaSize, Reference, SizeError, size_of, small_int_values

#: (modality, size) → what vLLM's processor makes of such media (`vlm.vllm_layout.ReferenceCache`).
References = Callable[[Modality, MediaSize], Reference]

# ------------------------------------------------------------------------------- prompt checks


def _ph(i: int, what: str = "") -> str:
    return f"prompt.items[{i}].placeholder" + (f".{what}" if what else "")


class PromptValidator:
    def __init__(
        self,
        profile: ModelProfile,
        limits: Limits | None = None,
        *,
        max_stop_strings: int | None = None,
        references: References | None = None,
    ) -> None:
        self.profile = spec = profile
        self.limits = limits or Limits()
        #: None: the "reference" layout check is off (no processor at hand, e.g. unit tests).
        self._references = references
        #: Stop strings per request (None: vLLM's VLLM_MAX_STOP_STRINGS, as its OpenAI server;
        #: read on the first request with stop strings, so that building a validator does not
        #: import vLLM).
        self._max_stop_strings = max_stop_strings
        self._placeholder_ids: dict[int, Modality] = {}
        for m in spec.modalities.values():
            for t in m.placeholder_token_ids:
                self._placeholder_ids.setdefault(t, m.modality)

    # -- the whole prompt, before features are resolved ------------------------------------

    def validate_prompt(self, prompt: Prompt) -> None:
        spec = self.profile
        if not prompt.fingerprint.same_model(spec.fingerprint):
            raise ModelMismatch(
                f"prompt was prepared for {prompt.fingerprint.describe()}; this service serves "
                f"{spec.fingerprint.describe()}",
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
            limit = mspec.max_items
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
                self._check_digest(i, item)
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
        self, i: int, item: Item, mspec: ModalityProfile, ids: Sequence[int]
    ) -> None:
        ph = item.placeholder
        embeds = ph.embed_count()
        budget = self.limits.max_embeds_per_item
        if budget is not None and embeds > budget:
            raise LimitExceeded(
                f"item has {embeds} embedding positions; the engine's encoder cache holds at most "
                f"{budget} per item",
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

    @staticmethod
    def _check_digest(i: int, item: Item) -> None:
        """The hash keys the feature store and vLLM's caches: it must be the digest of the
        fields that came with it, never just a claim."""
        digest = item_digest(item.modality, item.fields or {})
        if digest != item.hash:
            raise InvalidArgument(
                f"the item's hash is not the digest of its fields (vlm.digest.item_digest gives "
                f"{digest}); an item's hash cannot be chosen by the sender",
                field=f"prompt.items[{i}].hash",
            )

    def validate_item_fields(self, i: int, item: Item) -> None:
        """Fields of one item against the modality's field specs, and the embed count."""
        assert item.fields is not None
        mspec = self.profile.modalities.get(item.modality)
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

    def _check_embed_count(self, i: int, item: Item, mspec: ModalityProfile) -> None:
        assert item.fields is not None
        ph = item.placeholder
        embeds = ph.embed_count()
        where = _ph(i, "is_embed" if ph.is_embed is not None else "length")
        for cname, rname in mspec.row_counts:
            cf, rf = item.fields.get(cname), item.fields.get(rname)
            if cf is None or rf is None or rf.data.dim() < 1:
                continue
            if cf.data.numel() != 1 or int(cf.data.reshape(-1)[0]) != rf.data.shape[0]:
                raise InvalidArgument(
                    f"{cname} says {cf.data.reshape(-1).tolist()} but {rname} has "
                    f"{rf.data.shape[0]} rows",
                    field=f"prompt.items[{i}].fields.{cname}.tensor",
                )
        if (mspec.size_source is not None and self._references is not None
                and self.limits.check_fixed_shapes):
            self._check_reference(i, item, mspec)
        if mspec.embeds_per_row is not None and mspec.embeds_per_row[0] in item.fields:
            name, k = mspec.embeds_per_row
            data = item.fields[name].data
            rows = data.shape[0] if data.dim() else 0
            if embeds != k * rows:
                raise InvalidArgument(
                    f"{name} has {rows} rows, which take {k * rows} embedding positions; the "
                    f"item has {embeds}",
                    field=where,
                )
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

    def reference_sizes(self, prompt: Prompt) -> list[tuple[Modality, MediaSize]]:
        """The (modality, size) references `validate_prompt` will look up for the items sent
        with fields (sizes it would refuse left out), so that a caller can make the missing
        ones off the event loop first."""
        if self._references is None or not self.limits.check_fixed_shapes:
            return []
        out = []
        for i, item in enumerate(prompt.items):
            mspec = self.profile.modalities.get(item.modality)
            if item.fields is None or mspec is None or mspec.size_source is None:
                continue
            try:
                out.append((item.modality, self._reference_size(i, item, mspec)))
            except (InvalidArgument, LimitExceeded):
                continue
        return out

    def _reference_size(self, i: int, item: Item, mspec: ModalityProfile) -> MediaSize:
        assert item.fields is not None and mspec.size_source is not None
        fpath = f"prompt.items[{i}].fields"
        try:
            size = size_of(item.modality, mspec.size_source, item.fields)
        except SizeError as e:
            raise InvalidArgument(str(e), field=f"{fpath}.{e.field}.tensor") from None
        spath = f"{fpath}.{mspec.size_source.field}.tensor"
        if min(size.width, size.height, size.frames) < 1:
            raise InvalidArgument(f"media size {size.width}x{size.height} must be positive", field=spath)
        if size.width * size.height * size.frames > self.limits.max_reference_pixels:
            raise LimitExceeded(
                f"media of {size.width}x{size.height} pixels x {size.frames} frame(s) is over this "
                f"service's {self.limits.max_reference_pixels} pixels", field=spath,
            )
        return size

    def _check_reference(self, i: int, item: Item, mspec: ModalityProfile) -> None:
        """The item against vLLM's processor run on a stand-in of the size its fields give."""
        assert item.fields is not None and mspec.size_source is not None and self._references
        fpath = f"prompt.items[{i}].fields"
        spath = f"{fpath}.{mspec.size_source.field}.tensor"
        size = self._reference_size(i, item, mspec)
        media = f"{size.width}x{size.height} {item.modality.value}" + (
            f" of {size.frames} frames" if item.modality is Modality.VIDEO else "")
        try:
            ref = self._references(item.modality, size)
        except Exception as e:  # noqa: BLE001 - vLLM's/HF's errors, translated here once
            raise InvalidArgument(
                f"vLLM's processor cannot make a {media}: {type(e).__name__}: {e}", field=spath
            ) from None
        for name, shape in ref.shapes.items():
            got = tuple(item.fields[name].data.shape) if name in item.fields else None
            if got != shape:
                raise InvalidArgument(
                    f"shape {list(got or ())} does not match the {list(shape)} vLLM's processor "
                    f"gives a {media}", field=f"{fpath}.{name}.tensor.shape",
                )
        values = small_int_values(item.fields)
        for name, expected in ref.values.items():
            if values.get(name) != expected:
                raise InvalidArgument(
                    f"values {list(values.get(name, ()))} do not match the {list(expected)} "
                    f"vLLM's processor gives a {media}", field=f"{fpath}.{name}.tensor",
                )
        ph = item.placeholder
        mask = ph.is_embed if ph.is_embed is not None else (True,) * ph.length
        ref_mask = ref.is_embed if ref.is_embed is not None else (True,) * ref.length
        if ph.length != ref.length or mask != ref_mask:
            what = "length" if ph.length != ref.length else "is_embed"
            raise InvalidArgument(
                f"a {media} takes {ref.length} placeholder positions with "
                f"{ref.embed_count()} embeddings (vLLM's prompt update); the item has "
                f"{ph.length} with {ph.embed_count()}", field=_ph(i, what),
            )

    def validate_resolved(self, items: Sequence[Item]) -> None:
        """After hash-only items got their fields from the store: check those too."""
        for i, item in enumerate(items):
            if item.fields is not None:
                mspec = self.profile.modalities.get(item.modality)
                if mspec is not None and mspec.fields is not None:
                    self._check_embed_count(i, item, mspec)

    # -- sampling ----------------------------------------------------------------------------

    def validate_sampling(self, sampling: Sampling, prompt_len: int) -> None:
        spec = self.profile
        if sampling.stop:
            if self._max_stop_strings is None:
                self._max_stop_strings = _vllm_max_stop_strings()
            if len(sampling.stop) > self._max_stop_strings:
                raise InvalidArgument(
                    f"{len(sampling.stop)} stop strings; at most {self._max_stop_strings} "
                    "(vLLM's VLLM_MAX_STOP_STRINGS)",
                    field="sampling.stop",
                )
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


def _vllm_max_stop_strings() -> int:
    try:
        from vllm import envs
    except ImportError:  # pragma: no cover - the model service always has vLLM
        return 4
    return int(envs.VLLM_MAX_STOP_STRINGS)


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")
