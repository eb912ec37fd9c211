"""Token-exact greedy output vs Hugging Face for every tiny architecture that runs in vLLM 0.32.

Each request goes client → PreprocessorApp (worker process: vLLM's renderer, HF processor) →
real gRPC → ModelApp (vLLM AsyncLLM engine) and back; the 16 greedy tokens (EOS ignored) must
equal HF `generate` on the same expanded prompt and the same feature tensors that crossed the
wire. Per architecture the HF model takes those tensors in its own layout, so the reference
adapts them (`hf_inputs`): that adaptation is where a wrong field layout or dtype on the wire
would show up. Single-image cases are also checked against HF's own processor run on the
decoded image (`_hf_from_media`), independently of the preprocessor.

One pipeline (one engine) per architecture, started when its class's first test runs and closed
when the class is done, so only one engine is alive at a time.

Architecture-specific facts the reference encodes (checked, see each adapter):

* Qwen2-VL and Mistral3 (Pixtral): vLLM 0.32 normalises pixels on the device
  (`mm_device_do_normalize`), so their `pixel_values` cross the wire as raw uint8; HF takes
  normalised floats, so the reference rescales/normalises with the checkpoint's processor
  config. Qwen2-VL's HF model also needs `mm_token_type_ids` for M-RoPE (built here from the
  items' placeholder ranges); vLLM derives M-RoPE from the `*_grid_thw` fields alone.
* LLaVA-OneVision: per-image anyres patch stacks differ in length between images; HF takes
  them zero-padded to one (images, patches, C, H, W) tensor (it slices by `image_sizes`).
* Mistral3: HF needs `image_sizes`, which vLLM does not send (it reads the size off the tensor).
* Idefics3: HF takes (1, tiles, C, H, W) and a boolean `pixel_attention_mask`; `num_patches`
  is vLLM bookkeeping only (also for Gemma3).
* Gemma3: HF's own semantics make image tokens attend bidirectionally (`token_type_ids`); vLLM's
  CPU attention backend has no mm-prefix (bidirectional) support, so vLLM on CPU computes plain
  causal attention. The reference is therefore HF *without* `token_type_ids`; an xfail(strict)
  test pins the gap so it is noticed when vLLM's CPU backend changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import grpc
import pytest
import pytest_asyncio
import torch
from PIL import Image

from tests.e2e.conftest import Pipeline, png, start_pipeline
from tests.service.model_core.hf_reference import hf_generate
from vlm import types
from vlm.digest import item_digest
from vlm.errors import UpstreamError
from vlm.testing.tiny_models import SPECS, build_tiny_model, warm_vllm_model_info_cache

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

IMAGE, VIDEO = types.Modality.IMAGE, types.Modality.VIDEO
N_TOKENS = 16
GREEDY = types.Sampling(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)


# ---------------------------------------------------------------------------------------------
# Media
# ---------------------------------------------------------------------------------------------


def _img(seed: int, size: tuple[int, int] = (48, 40)) -> types.Media:
    return types.Media(IMAGE, png(seed, size), "image/png")


def mp4_bytes(seed: int, frames: int = 6, size: int = 64, fps: float = 4.0) -> bytes:
    """An MP4 ('mp4v') of `frames` random-ish frames: smooth colour gradients plus noise, each
    frame different."""
    import cv2

    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
        assert writer.isOpened(), "OpenCV cannot write mp4v here"
        for k in range(frames):
            base = np.stack([xx, yy, (xx + yy + k / frames) % 1.0], axis=-1) * 200
            noise = rng.randint(0, 56, (size, size, 3))
            writer.write((base + noise).astype(np.uint8))
        writer.release()
        data = Path(path).read_bytes()
    assert data[4:8] == b"ftyp", "not an MP4 container"
    return data


def _video(seed: int) -> types.Media:
    return types.Media(VIDEO, mp4_bytes(seed), "video/mp4")


# ---------------------------------------------------------------------------------------------
# HF reference from a preprocessed Prompt
# ---------------------------------------------------------------------------------------------

_MODALITY_TYPE_ID = {IMAGE: 1, VIDEO: 2}  # HF's mm_token_type_ids: 0 text, 1 image, 2 video


def _embed_positions(item: types.Item) -> list[int]:
    ph = item.placeholder
    mask = ph.is_embed if ph.is_embed is not None else (True,) * ph.length
    return [ph.offset + i for i, e in enumerate(mask) if e]


def _normalize_uint8(x: torch.Tensor, model_dir: Path, channel_dim: int) -> torch.Tensor:
    """(x * rescale_factor - mean) / std per channel, as the HF image processor does; `x` is a
    uint8 tensor, either (patches, C * rest) (Qwen2-VL's flattened patches, channel-major) or
    with a channel axis at `channel_dim`."""
    assert x.dtype == torch.uint8, x.dtype
    cfg = json.loads((model_dir / "processor_config.json").read_text())["image_processor"]
    assert cfg.get("do_rescale", True) and cfg.get("do_normalize", True)
    scale = float(cfg["rescale_factor"])
    mean = torch.tensor(cfg["image_mean"], dtype=torch.float32)
    std = torch.tensor(cfg["image_std"], dtype=torch.float32)
    if x.dim() == 2:
        n = x.shape[0]
        y = x.reshape(n, 3, -1).float()
        return ((y * scale - mean.view(1, 3, 1)) / std.view(1, 3, 1)).reshape(n, -1)
    shape = [1] * x.dim()
    shape[channel_dim] = 3
    return (x.float() * scale - mean.view(shape)) / std.view(shape)


def _fields(prompt: types.Prompt) -> dict[str, list[types.ItemField]]:
    out: dict[str, list[types.ItemField]] = {}
    for item in prompt.items:
        assert item.fields is not None, "preprocessed items carry their fields"
        for name, f in item.fields.items():
            out.setdefault(name, []).append(f)
    return out


def _llava_onevision(fs, prompt, model_dir) -> dict[str, torch.Tensor]:
    x: dict[str, torch.Tensor] = {}
    if "pixel_values" in fs:
        # (patches_i, C, H, W) per image, patches_i from the anyres grid: zero-pad to
        # (images, max_patches, C, H, W); HF keeps the first patches_i (from image_sizes).
        pv = [f.data for f in fs["pixel_values"]]
        n = max(p.shape[0] for p in pv)
        x["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros((n - len(p), *p.shape[1:]))]) for p in pv])
        x["image_sizes"] = torch.stack([f.data for f in fs["image_sizes"]])
    if "pixel_values_videos" in fs:
        x["pixel_values_videos"] = torch.stack([f.data for f in fs["pixel_values_videos"]])
    return x


def _qwen2_vl(fs, prompt, model_dir) -> dict[str, torch.Tensor]:
    x: dict[str, torch.Tensor] = {}
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if pixels not in fs:
            continue
        assert all(f.layout is types.FieldLayout.FLAT for f in fs[pixels])
        flat = torch.cat([f.data for f in fs[pixels]], dim=fs[pixels][0].flat_dim)
        x[pixels] = _normalize_uint8(flat, model_dir, 1) if flat.dtype == torch.uint8 else flat
        x[grid] = torch.stack([f.data for f in fs[grid]])
    # HF computes M-RoPE from these (vLLM from the grids and the placeholder ranges).
    types_ = torch.zeros(len(prompt.token_ids), dtype=torch.long)
    for item in prompt.items:
        types_[_embed_positions(item)] = _MODALITY_TYPE_ID[item.modality]
    x["mm_token_type_ids"] = types_[None]
    return x


def _mistral3(fs, prompt, model_dir) -> dict[str, torch.Tensor]:
    pv = [f.data for f in fs["pixel_values"]]  # (C, H, W) each
    assert len({tuple(p.shape) for p in pv}) == 1, "the reference stacks same-size images only"
    stacked = torch.stack(pv)
    return {
        "pixel_values": _normalize_uint8(stacked, model_dir, 1) if stacked.dtype == torch.uint8 else stacked,
        "image_sizes": torch.tensor([list(p.shape[-2:]) for p in pv]),
    }


def _gemma3(fs, prompt, model_dir) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.cat([f.data for f in fs["pixel_values"]])}


def _idefics3(fs, prompt, model_dir) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.cat([f.data for f in fs["pixel_values"]])[None],
        "pixel_attention_mask": torch.cat([f.data for f in fs["pixel_attention_mask"]])[None].bool(),
    }


HF_ADAPTERS: Mapping[str, Callable[..., dict[str, torch.Tensor]]] = {
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "mistral3": _mistral3,
    "gemma3": _gemma3,
    "idefics3": _idefics3,
}


def hf_inputs(arch: str, model_dir: Path, prompt: types.Prompt) -> dict[str, torch.Tensor]:
    x = HF_ADAPTERS[arch](_fields(prompt), prompt, model_dir)
    ids = torch.tensor([list(prompt.token_ids)], dtype=torch.long)
    x["input_ids"] = ids
    x["attention_mask"] = torch.ones_like(ids)
    return x


def _hf_generate(model_dir: Path, inputs: Mapping[str, torch.Tensor]) -> list[int]:
    return hf_generate(str(model_dir), inputs, N_TOKENS)


def _perturbed(prompt: types.Prompt, index: int) -> types.Prompt:
    """The prompt with item `index`'s pixels replaced by their photographic negative."""
    item = prompt.items[index]
    fields = {}
    for name, f in (item.fields or {}).items():
        if name.startswith("pixel_values"):
            d = 255 - f.data if f.data.dtype == torch.uint8 else -f.data
            f = types.ItemField(d, f.layout, f.flat_dim, f.keep_on_cpu)
        fields[name] = f
    items = list(prompt.items)
    items[index] = types.Item(item.modality, item.hash, item.placeholder, fields)
    return types.Prompt(prompt.fingerprint, prompt.token_ids, tuple(items), prompt.prompt_text)


def hf_reference(arch: str, model_dir: Path, prompt: types.Prompt) -> list[int]:
    """HF greedy tokens for `prompt`; also checks that every item matters: negating one item's
    pixels changes HF's tokens (else the comparison could not tell a wrong item from a right one)."""
    expected = _hf_generate(model_dir, hf_inputs(arch, model_dir, prompt))
    for k, item in enumerate(prompt.items):
        other = _hf_generate(model_dir, hf_inputs(arch, model_dir, _perturbed(prompt, k)))
        assert other != expected, f"{arch}: HF's output does not depend on item {k} ({item.modality.value})"
    return expected


def _hf_from_media(model_dir: Path, prompt: types.Prompt, images: list[bytes]) -> tuple[list[int], list[int]]:
    """Independent reference: HF's own processor on the prompt text and the decoded images.

    Returns (expanded token IDs, greedy tokens). `token_type_ids` (Gemma3's bidirectional
    image attention) is dropped: see the module docstring.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    inputs = dict(processor(text=[prompt.prompt_text], images=pil, return_tensors="pt", add_special_tokens=False))
    inputs.pop("token_type_ids", None)
    return inputs["input_ids"][0].tolist(), _hf_generate(model_dir, inputs)


# ---------------------------------------------------------------------------------------------
# Pipelines: one per architecture, alive for its test class only
# ---------------------------------------------------------------------------------------------


def _prewarm_preprocessor_forkserver() -> None:
    """Best effort: start the preprocessor workers' forkserver now. It imports vLLM once (about
    15 s here); started first, that import overlaps the engine start (which blocks the event loop
    and spawns vLLM's engine-core process) instead of following it. Later workers fork from it."""
    try:
        import multiprocessing.forkserver

        from preprocessor_svc.pool import _mp_context

        _mp_context("forkserver")  # sets the forkserver's preload list
        multiprocessing.forkserver.ensure_running()
    except Exception:  # noqa: BLE001 - purely an optimisation
        pass


#: The features-vs-placeholder check each architecture's probe must find (`layout_check`).
LAYOUT_CHECKS = {
    ("llava_onevision", IMAGE): "reference",  # image_sizes
    ("llava_onevision", VIDEO): "reference",  # frames x frame size of pixel_values_videos
    ("qwen2_vl", IMAGE): "grid",
    ("qwen2_vl", VIDEO): "grid",
    ("mistral3", IMAGE): "reference",  # (height, width) of pixel_values
    ("gemma3", IMAGE): "reference",
    ("idefics3", IMAGE): "per_row",  # tiles only: the raw size is gone
}


@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def pipe(request, e2e_models_root) -> Pipeline:
    arch = request.cls.ARCH
    assert SPECS[arch].runs_in_vllm
    t0 = time.perf_counter()
    _prewarm_preprocessor_forkserver()
    model_dir = await asyncio.to_thread(build_tiny_model, arch, e2e_models_root / arch)
    # Skips vLLM's ~25 s model-inspection subprocess on a cold cache (best effort).
    await asyncio.to_thread(warm_vllm_model_info_cache, model_dir)
    p = await start_pipeline(arch, e2e_models_root)
    print(f"\n[{arch}] pipeline up in {time.perf_counter() - t0:.1f}s", flush=True)
    # Full validation strength for every tested architecture: the probe derived every
    # modality's field specs and an embed-count relation where one exists, on both services.
    for app in (p.model, p.pre):
        reg = app.grpc.metrics.registry
        for modality, mp in p.model.engine.profile.modalities.items():
            assert mp.fields, f"{arch}/{modality.value}: no field specs (generic checks only)"
            assert mp.placeholder_token_ids, f"{arch}/{modality.value}: no placeholder tokens"
            assert reg.get_sample_value("vlm_model_profile_field_checks", {"modality": modality.value}) == 1.0
            # How features are checked to fit their placeholders (issue 14 §2), as expected.
            check = LAYOUT_CHECKS[(arch, modality)]
            assert mp.layout_check == check, (arch, modality, mp)
            assert reg.get_sample_value("vlm_model_profile_layout_check",
                                        {"modality": modality.value, "check": check}) == 1.0
    assert p.model.engine.profile == p.pre.preprocessor.profile
    try:
        yield p
    finally:
        await p.pre.close()
        await p.model.close()


async def _collect(stream) -> tuple[list[int], types.Chunk]:
    ids, last = [], None
    async for chunk in stream:
        ids.extend(chunk.token_ids)
        last = chunk
    return ids, last


def _check_layout(prompt: types.Prompt, modalities: list[types.Modality]) -> None:
    """Items in prompt order, non-overlapping, inside the prompt; each item's embedding
    positions hold one placeholder token, distinct per modality."""
    assert [i.modality for i in prompt.items] == modalities
    end = 0
    tokens: dict[types.Modality, set[int]] = {}
    for item in prompt.items:
        ph = item.placeholder
        assert ph.offset >= end and ph.end <= len(prompt.token_ids), ph
        assert ph.is_embed is None or len(ph.is_embed) == ph.length
        end = ph.end
        toks = {prompt.token_ids[p] for p in _embed_positions(item)}
        assert len(toks) == 1, (item.modality, toks)
        tokens.setdefault(item.modality, set()).update(toks)
    assert all(len(t) == 1 for t in tokens.values()), tokens
    if len(tokens) > 1:
        assert len(set.union(*tokens.values())) == len(tokens), tokens


async def _run(
    pipe: Pipeline, prompt_in: types.PromptInput, modalities: list[types.Modality]
) -> tuple[types.Prompt, list[int]]:
    """Preprocess (for the reference), generate end to end, compare with HF token for token."""
    async with pipe.pre_client() as pre, pipe.model_client() as model:
        # One model profile, derived by the same code on both sides: identical GetModelInfo.
        assert await pre.model_info() == await model.model_info()
        prompt = await pre.preprocess(prompt_in)
        _check_layout(prompt, modalities)
        ids, last = await _collect(pre.generate(prompt_in, GREEDY))
    expected = await asyncio.to_thread(hf_reference, pipe.arch, pipe.model_dir, prompt)
    assert ids == expected, f"{pipe.arch}: vLLM {ids} != HF {expected}"
    assert last.finish_reason is types.FinishReason.LENGTH
    assert last.usage.prompt_tokens == len(prompt.token_ids)
    assert last.usage.completion_tokens == N_TOKENS
    return prompt, ids


async def _run_one_image(pipe: Pipeline, text: str, image: bytes) -> types.Prompt:
    prompt_in = types.PromptInput(text=text, media=(types.Media(IMAGE, image, "image/png"),))
    prompt, ids = await _run(pipe, prompt_in, [IMAGE])
    hf_ids, hf_out = await asyncio.to_thread(_hf_from_media, pipe.model_dir, prompt, [image])
    assert list(prompt.token_ids) == hf_ids, "expanded prompt differs from HF's processor"
    assert ids == hf_out, f"{pipe.arch}: vLLM {ids} != HF (own processor) {hf_out}"
    return prompt


async def _assert_swap_refused(
    pipe: Pipeline, text: str, a: types.Media, b: types.Media | None = None, *,
    b_fields: Callable[[types.Item], dict[str, types.ItemField]] | None = None, field: str,
) -> UpstreamError:
    """Issue 14 §2: B's features (re-hashed, so that only their fit can tell) in A's placeholder
    are refused by the model service with INVALID_ARGUMENT naming `field`; A itself, sent as
    preprocessed, still generates. B is preprocessed media, or fields made from A's item."""
    async with pipe.pre_client() as pre, pipe.model_client() as model:
        pa = await pre.preprocess(types.PromptInput(text=text, media=(a,)))
        (ia,) = pa.items
        if b is not None:
            (ib,) = (await pre.preprocess(types.PromptInput(text=text, media=(b,)))).items
        else:
            assert b_fields is not None
            ib = dataclasses.replace(ia, fields=b_fields(ia))
        swapped = dataclasses.replace(ia, fields=ib.fields, hash=item_digest(ib.modality, ib.fields))
        assert swapped.hash != ia.hash
        with pytest.raises(UpstreamError) as exc:
            await _collect(model.generate(dataclasses.replace(pa, items=(swapped,)), GREEDY,
                                          hash_only=False))
        err = exc.value
        assert (err.code, err.upstream_field) == (grpc.StatusCode.INVALID_ARGUMENT, field), err
        ids, last = await _collect(model.generate(pa, GREEDY, hash_only=False))
        assert len(ids) == N_TOKENS and last.finish_reason is types.FinishReason.LENGTH
    return err


class _KnownVllmRefusal(Exception):
    """The preprocessor refused the prompt exactly as the recorded vLLM bug predicts."""


# ---------------------------------------------------------------------------------------------
# Tests, one class (one engine) per architecture
# ---------------------------------------------------------------------------------------------


class TestLlavaOnevision:
    ARCH = "llava_onevision"
    TOK = SPECS[ARCH]

    async def test_one_image(self, pipe) -> None:
        await _run_one_image(pipe, f"{self.TOK.image_token}\nWhat is in the picture?", png(11, (48, 40)))

    async def test_two_images_of_different_grids(self, pipe) -> None:
        # 48x40 and 64x24 land on different anyres grid pinpoints: different patch counts.
        prompt_in = types.PromptInput(
            text=f"{self.TOK.image_token}\n{self.TOK.image_token}\nCompare the two pictures.",
            media=(_img(12, (48, 40)), _img(13, (64, 24))),
        )
        prompt, _ = await _run(pipe, prompt_in, [IMAGE, IMAGE])
        lengths = [it.placeholder.length for it in prompt.items]
        assert lengths[0] != lengths[1], lengths

    async def test_image_and_video_interleaved(self, pipe) -> None:
        prompt_in = types.PromptInput(
            text=f"{self.TOK.image_token}\nFirst the picture, then the clip: {self.TOK.video_token}\nDescribe.",
            media=(_img(14), _video(15)),
        )
        prompt, _ = await _run(pipe, prompt_in, [IMAGE, VIDEO])
        image, video = prompt.items
        assert image.placeholder.end < video.placeholder.offset
        assert video.fields["pixel_values_videos"].data.shape[0] == 6  # every frame of the clip

    async def test_image_features_of_another_size_are_refused(self, pipe) -> None:
        # Anyres: 48x40 and 64x24 differ in patch count and placeholder; the layout is checked
        # against vLLM's processor run on a stand-in of the size `image_sizes` claims.
        err = await _assert_swap_refused(
            pipe, f"{self.TOK.image_token}\nDescribe.", _img(16, (48, 40)), _img(17, (64, 24)),
            field="prompt.items[0].placeholder.length",
        )
        assert "64x24 image" in err.message, err.message

    async def test_video_features_of_another_length_are_refused(self, pipe) -> None:
        short = types.Media(VIDEO, mp4_bytes(18, frames=4, size=48), "video/mp4")
        err = await _assert_swap_refused(
            pipe, f"{self.TOK.video_token}\nDescribe.", _video(19), short,
            field="prompt.items[0].placeholder.length",
        )
        assert "of 4 frames" in err.message, err.message


class TestQwen2VL:
    ARCH = "qwen2_vl"
    TOK = SPECS[ARCH]

    async def test_one_image(self, pipe) -> None:
        prompt = await _run_one_image(pipe, f"{self.TOK.image_token}What is in the picture?", png(21, (48, 40)))
        (item,) = prompt.items
        assert item.fields["pixel_values"].data.dtype == torch.uint8  # normalised on the device
        assert item.fields["image_grid_thw"].data.tolist()[0] == 1

    async def test_video_and_image_in_one_request(self, pipe) -> None:
        # Video first: M-RoPE positions of the image depend on the video's grid before it.
        prompt_in = types.PromptInput(
            text=f"{self.TOK.video_token}Then a picture: {self.TOK.image_token}Describe both.",
            media=(_img(22, (64, 40)), _video(23)),
        )
        prompt, _ = await _run(pipe, prompt_in, [VIDEO, IMAGE])
        video = prompt.items[0]
        t, h, w = video.fields["video_grid_thw"].data.tolist()
        assert t >= 2 and video.placeholder.embed_count() == t * h * w // 4  # merge_size 2

    async def test_chat_messages_with_image_and_video(self, pipe) -> None:
        prompt_in = types.PromptInput(messages=(
            types.ChatMessage("user", (
                types.ChatPart(text="Look: "),
                types.ChatPart(media=_img(24)),
                types.ChatPart(text=" and "),
                types.ChatPart(media=_video(25)),
                types.ChatPart(text=" What happens?"),
            )),
        ))
        prompt, _ = await _run(pipe, prompt_in, [IMAGE, VIDEO])
        assert prompt.prompt_text is not None and prompt.prompt_text.endswith("ASSISTANT:")

    async def test_image_features_of_another_size_are_refused(self, pipe) -> None:
        await _assert_swap_refused(
            pipe, f"{self.TOK.image_token}Describe.", _img(26, (48, 40)), _img(27, (200, 150)),
            field="prompt.items[0].placeholder.length",
        )

    async def test_video_features_of_another_size_are_refused(self, pipe) -> None:
        longer = types.Media(VIDEO, mp4_bytes(28, frames=16, size=48), "video/mp4")
        await _assert_swap_refused(
            pipe, f"{self.TOK.video_token}Describe.", _video(29), longer,
            field="prompt.items[0].placeholder.length",
        )


class TestMistral3:
    ARCH = "mistral3"
    TOK = SPECS[ARCH]

    async def test_one_image_non_contiguous_is_embed(self, pipe) -> None:
        from transformers import AutoTokenizer

        # 64x32: 8x4 patches, merged 2x2 -> 2 rows of 4 [IMG], each row ended by [IMG_BREAK],
        # the last by [IMG_END]: not square, so a transposed layout would show.
        prompt = await _run_one_image(pipe, f"{self.TOK.image_token}What is in the picture?", png(31, (64, 32)))
        (item,) = prompt.items
        tok = AutoTokenizer.from_pretrained(str(pipe.model_dir))
        img, brk, end = tok.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
        ph = item.placeholder
        span = prompt.token_ids[ph.offset:ph.end]
        assert ph.is_embed is not None
        assert list(span) == [img] * 4 + [brk] + [img] * 4 + [end], span
        assert list(ph.is_embed) == [t == img for t in span]
        assert [i for i, e in enumerate(ph.is_embed) if not e] == [4, 9]
        assert item.fields["pixel_values"].data.dtype == torch.uint8

    async def test_features_of_another_size_are_refused(self, pipe) -> None:
        # The measured hole: a 64x64 image's pixels in a 32x64 image's range used to complete
        # with other tokens and no error.
        err = await _assert_swap_refused(
            pipe, f"{self.TOK.image_token}Describe.", _img(32, (64, 32)), _img(33, (64, 64)),
            field="prompt.items[0].placeholder.length",
        )
        assert "64x64 image" in err.message, err.message

    async def test_transposed_features_of_the_same_count_are_refused(self, pipe) -> None:
        # 64x32 and 32x64: 8 embeddings each, but rows of 4 vs rows of 2: only the exact
        # is_embed layout (vLLM's prompt update) tells them apart.
        await _assert_swap_refused(
            pipe, f"{self.TOK.image_token}Describe.", _img(34, (64, 32)), _img(35, (32, 64)),
            field="prompt.items[0].placeholder.length",
        )


class TestGemma3:
    ARCH = "gemma3"
    TOK = SPECS[ARCH]
    # No "\n" right after the image: see test_image_followed_by_newline.
    TEXT = f"{TOK.image_token} What is in the picture?"

    async def test_one_image(self, pipe) -> None:
        prompt = await _run_one_image(pipe, self.TEXT, png(41, (48, 40)))
        (item,) = prompt.items
        assert item.placeholder.embed_count() == 16

    @pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
        "vLLM 0.32's CPU attention has no mm-prefix (bidirectional) attention: Gemma3's image "
        "tokens attend causally in vLLM on CPU, bidirectionally in HF (token_type_ids)"))
    async def test_bidirectional_image_attention_as_hf(self, pipe) -> None:
        from transformers import AutoProcessor

        image = png(41, (48, 40))
        async with pipe.pre_client() as pre:
            prompt_in = types.PromptInput(text=self.TEXT, media=(types.Media(IMAGE, image, "image/png"),))
            ids, _ = await _collect(pre.generate(prompt_in, GREEDY))

        def hf_bidirectional() -> list[int]:
            processor = AutoProcessor.from_pretrained(str(pipe.model_dir))
            pil = Image.open(io.BytesIO(image)).convert("RGB")
            inputs = dict(processor(text=[self.TEXT], images=[pil], return_tensors="pt", add_special_tokens=False))
            assert "token_type_ids" in inputs
            return _hf_generate(pipe.model_dir, inputs)

        assert ids == await asyncio.to_thread(hf_bidirectional)


    async def test_features_with_extra_crops_are_refused(self, pipe) -> None:
        # Without pan-and-scan every image is one 64x64 crop, so image features can't be of
        # another size; pan-and-scan's extra crops (3 here, counted right) don't fit the range.
        def three_crops(item: types.Item) -> dict[str, types.ItemField]:
            pv, n = item.fields["pixel_values"], item.fields["num_patches"]
            return {
                "pixel_values": dataclasses.replace(pv, data=pv.data.repeat(3, 1, 1, 1)),
                "num_patches": dataclasses.replace(n, data=torch.full_like(n.data, 3)),
            }

        await _assert_swap_refused(
            pipe, self.TEXT, _img(43, (48, 40)), b_fields=three_crops,
            field="prompt.items[0].fields.pixel_values.tensor.shape",
        )

    async def test_crop_count_must_match_the_crops(self, pipe) -> None:
        def miscounted(item: types.Item) -> dict[str, types.ItemField]:
            n = item.fields["num_patches"]
            return {**item.fields, "num_patches": dataclasses.replace(n, data=torch.full_like(n.data, 2))}

        await _assert_swap_refused(
            pipe, self.TEXT, _img(45, (48, 40)), b_fields=miscounted,
            field="prompt.items[0].fields.num_patches.tensor",
        )

    @pytest.mark.xfail(strict=True, raises=_KnownVllmRefusal, reason=(
        "vLLM 0.32 Gemma3 processor bug: after expansion the image's trailing '\\n\\n' and the "
        "prompt's '\\n' are merged into the '\\n\\n\\n' token, which _find_mm_placeholders "
        "splits back as '\\n' + '\\n\\n' (wrong order), so no placeholder is found: RuntimeError "
        "'Expected there to be 1 prompt placeholders ... but instead found 0', which the "
        "preprocessor answers INVALID_ARGUMENT naming prompt.text. HF's processor takes this prompt."))
    async def test_image_followed_by_newline(self, pipe) -> None:
        try:
            await _run_one_image(pipe, f"{self.TOK.image_token}\nWhat is in the picture?", png(42, (48, 40)))
        except UpstreamError as e:
            # Exactly the known refusal, not any failure.
            assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.upstream_field == "prompt.text", e
            raise _KnownVllmRefusal(e.message) from e


class TestIdefics3:
    ARCH = "idefics3"
    TOK = SPECS[ARCH]

    async def test_one_image(self, pipe) -> None:
        # 48x40 > one 32px tile: split into tiles (<row_i_col_j>) plus the global image.
        prompt = await _run_one_image(pipe, f"{self.TOK.image_token}What is in the picture?", png(51, (48, 40)))
        (item,) = prompt.items
        assert item.fields["pixel_values"].data.shape[0] > 1
        assert item.placeholder.is_embed is not None and not all(item.placeholder.is_embed)

    async def test_features_with_another_tile_count_are_refused(self, pipe) -> None:
        # The raw size is gone (tiles only): embeds == 4 x tiles is what is checked.
        await _assert_swap_refused(
            pipe, f"{self.TOK.image_token}Describe.", _img(52, (48, 40)), _img(53, (96, 24)),
            field="prompt.items[0].placeholder.is_embed",
        )

