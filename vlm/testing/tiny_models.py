"""Tiny random-weight VLM checkpoints, built offline for tests.

Each architecture is built from transformers config classes, with its own small byte-level
BPE tokenizer (made with the ``tokenizers`` library), a chat template, and the family's
processor, and saved in the checkpoint layout that hub checkpoints use (and vLLM loads).

Usage::

    from vlm.testing.tiny_models import SPECS, build_tiny_model
    model_dir = build_tiny_model("llava", tmp_dir)

Weights are re-drawn with a large std (``_INIT_STD``) so greedy outputs depend on the image.
A build is deterministic for a given seed. ``build_tiny_model`` writes into a private
temporary directory and renames it into place, so concurrent calls are safe; a directory that
already holds a complete build (marker file written last) is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

ARCHITECTURES: tuple[str, ...] = (
    "llava",
    "llava_onevision",
    "qwen2_vl",
    "mistral3",
    "gemma3",
    "idefics3",
    "fuyu",
)


@dataclass(frozen=True)
class TinyModelSpec:
    arch: str
    image_token: str  # placeholder text a text prompt uses per image, e.g. "<image>"
    video_token: str | None  # None if the model has no video support
    runs_in_vllm: bool  # False for an arch vLLM 0.32 CPU cannot run (see `note`)
    note: str = ""


SPECS: dict[str, TinyModelSpec] = {
    "llava": TinyModelSpec("llava", "<image>", None, True, "LLaVA-1.5 style: CLIP ViT + Llama"),
}

# Bump when the build recipe changes: a directory built by another version is rebuilt.
_BUILD_VERSION = 1
_MARKER = ".tiny_model_complete.json"
_INIT_STD = 0.08

# Text model sizes: vLLM's CPU attention needs head_dim >= 32.
_TEXT_HIDDEN = 128
_TEXT_HEADS = 4
_TEXT_KV_HEADS = 2
_TEXT_LAYERS = 2
_TEXT_INTERMEDIATE = 256
_MAX_POS = 4096
_VOCAB_TARGET = 480  # learned BPE vocab (bytes + merges), before special tokens

_BOS = "<s>"
_EOS = "</s>"
_PAD = "<pad>"
_UNK = "<unk>"

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
What is in this image? Describe the picture in detail. The image shows a cat sitting on a
red chair next to a window. There is a small dog playing with a ball in the green grass.
How many people are in the photo? Two people are walking along the beach at sunset.
The sky is blue and the clouds are white. A car is parked on the street near a tall building.
What color is the shirt of the man? He is wearing a yellow shirt and black trousers.
Please answer the question briefly. The answer is yes. The answer is no. I do not know.
This video shows a person cooking dinner in a kitchen. First they cut the vegetables, then
they put them in a pan. The water is boiling. The train arrives at the station on time.
Children are reading books in the library. The weather today is sunny with a light wind.
Read the text in the image. Count the objects on the table: one apple, two oranges, three
bananas. The bird flies over the river and lands on a branch of an old tree.
user assistant system USER ASSISTANT Question Answer image video frame describe left right
top bottom center small large number 0 1 2 3 4 5 6 7 8 9 10 100 1000
"""


def _bpe_tokenizer(extra_tokens: list[str], special_tokens: list[str], *, sentencepiece_style: bool):
    """Train a small byte-level BPE (deterministic) and add the given tokens.

    ``special_tokens`` are added as special (skipped when decoding); ``extra_tokens`` as normal
    added tokens (e.g. literal newlines that some processors look up in the vocabulary).
    With ``sentencepiece_style``, words are marked with "▁" (Metaspace) instead of "Ġ".
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    if sentencepiece_style:
        # SentencePiece-style BPE over characters with "▁" for spaces and byte fallback.
        tok = Tokenizer(models.BPE(unk_token=_UNK, byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(
            vocab_size=_VOCAB_TARGET + 256,
            special_tokens=[_UNK, _BOS, _EOS, _PAD, *byte_tokens],
            initial_alphabet=sorted(set(_CORPUS) | {"▁"}),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_VOCAB_TARGET,
            special_tokens=[_BOS, _EOS, _PAD, _UNK],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    if extra_tokens:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in extra_tokens])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens])
    return tok


def _chat_template(image_text: str, video_text: str | None, *, user: str = "USER", assistant: str = "ASSISTANT") -> str:
    """Jinja chat template: strings or content lists of text/image/video parts."""
    # json.dumps gives a string literal that is also valid in jinja (double quotes, \n escapes)
    img = json.dumps(image_text)
    vid = json.dumps(video_text) if video_text else None
    video_branch = f"{{%- elif part['type'] == 'video' -%}}{{{{- {vid} -}}}}" if vid else ""
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- '" + user + ": ' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- '" + assistant + ": ' -}}"
        "{%- else -%}{{- message['role'] | upper + ': ' -}}{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
        f"{{%- elif part['type'] == 'image' or part['type'] == 'image_url' -%}}{{{{- {img} -}}}}"
        f"{video_branch}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
        "{{- '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + assistant + ":' -}}{%- endif -%}"
    )


def _make_tokenizer(
    *,
    named: dict[str, str] | None = None,
    special: list[str] | None = None,
    extra: list[str] | None = None,
    chat_template: str,
    sentencepiece_style: bool = False,
    bos: str = _BOS,
    eos: str = _EOS,
    pad: str = _PAD,
    unk: str | None = _UNK,
):
    """Build a transformers fast tokenizer.

    ``named``: attribute name -> token (e.g. {"image_token": "<image>"}), exposed as
    ``tokenizer.image_token`` / ``tokenizer.image_token_id`` (via ``extra_special_tokens``).
    ``special``: more special tokens without a name. ``extra``: normal added tokens.
    """
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    special = list(special or [])
    specials: list[str] = []
    for t in [bos, eos, pad, *(x for x in [unk] if x), *named.values(), *special]:
        if t not in specials:
            specials.append(t)
    backend = _bpe_tokenizer(list(extra or []), specials, sentencepiece_style=sentencepiece_style)
    kwargs: dict[str, Any] = dict(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=chat_template,
        model_max_length=_MAX_POS,
        clean_up_tokenization_spaces=False,
    )
    if unk:
        kwargs["unk_token"] = unk
    if named:
        kwargs["extra_special_tokens"] = named
    tok = PreTrainedTokenizerFast(**kwargs)
    if special:
        tok.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    return tok


# ---------------------------------------------------------------------------------------------
# Weights and checkpoint layout
# ---------------------------------------------------------------------------------------------


def _redraw_weights(model, seed: int, std: float = _INIT_STD) -> None:
    """Re-draw every weight from N(0, std) (norm weights ~ 1 + N(0, std), biases small).

    Parameters are visited in sorted-name order with a private generator: deterministic.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            lname = name.lower()
            is_norm = "norm" in lname or "ln_" in lname or "layrnorm" in lname
            if is_norm and p.dim() == 1 and name.endswith("weight"):
                base = torch.zeros_like(p) if _norm_is_offset(model, name) else torch.ones_like(p)
                p.copy_(base + noise.to(p.dtype))
            elif name.endswith("bias"):
                p.copy_((noise * 0.25).to(p.dtype))
            else:
                p.copy_(noise.to(p.dtype))


def _norm_is_offset(model, name: str) -> bool:
    """Gemma-style RMSNorm stores (weight - 1): a zero weight means identity."""
    mod = model
    for part in name.split(".")[:-1]:
        mod = getattr(mod, part)
    return type(mod).__name__.startswith("Gemma") and "RMSNorm" in type(mod).__name__


def _rename_safetensors(model_dir: pathlib.Path, rename: Callable[[str], str]) -> None:
    """Rename tensor keys in every *.safetensors file of ``model_dir`` (and its index)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(model_dir.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            tensors = {rename(k): sf.get_tensor(k) for k in sf.keys()}
        save_file(tensors, str(f), metadata=meta)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def _prefix_renamer(pairs: list[tuple[str, str]]) -> Callable[[str], str]:
    def rename(key: str) -> str:
        for old, new in pairs:
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    return rename


def _vision_model_renamer(tower: str) -> Callable[[str], str]:
    """Hub layout for CLIP/SigLIP towers: ``<tower>.X`` -> ``<tower>.vision_model.X``.

    transformers 5.x saves the tower without the ``vision_model`` level (and strips it again on
    load); vLLM's native loaders expect it, as in real hub checkpoints.
    """

    def rename(key: str) -> str:
        for prefix in (f"{tower}.", f"model.{tower}."):
            if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                return prefix + "vision_model." + key[len(prefix) :]
        return key

    return rename


def _check_reload(model, model_dir: pathlib.Path) -> None:
    """Check that transformers reloads exactly the tensors we saved (layout round trip)."""
    import torch
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    want = model.state_dict()
    got = reloaded.state_dict()
    if set(want) != set(got):
        raise RuntimeError(f"reload changed parameter names: {sorted(set(want) ^ set(got))[:10]}")
    for k, v in want.items():
        if not torch.equal(v, got[k]):
            raise RuntimeError(f"reload changed tensor {k}")


def _text_kwargs(vocab_size: int, **over) -> dict[str, Any]:
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=_TEXT_INTERMEDIATE,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_TEXT_HEADS,
        num_key_value_heads=_TEXT_KV_HEADS,
        head_dim=_TEXT_HIDDEN // _TEXT_HEADS,
        max_position_embeddings=_MAX_POS,
        tie_word_embeddings=False,
    )
    kw.update(over)
    return kw


def _set_token_ids(cfg, tok) -> None:
    for c in {id(cfg): cfg, id(getattr(cfg, "text_config", cfg)): getattr(cfg, "text_config", cfg)}.values():
        c.bos_token_id = tok.bos_token_id
        c.eos_token_id = tok.eos_token_id
        c.pad_token_id = tok.pad_token_id


# ---------------------------------------------------------------------------------------------
# Per-architecture builders: each returns (model, processor, rename) and the caller saves.
# ---------------------------------------------------------------------------------------------

_IMAGE_MEAN = [0.5, 0.5, 0.5]
_IMAGE_STD = [0.5, 0.5, 0.5]


def _build_llava(seed: int):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image = "<image>"
    tok = _make_tokenizer(named={"image_token": image}, chat_template=_chat_template(image, None))
    image_size, patch = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=64,
    )
    text = LlamaConfig(**_text_kwargs(len(tok)))
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(image),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    _set_token_ids(cfg, tok)
    improc = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
    )
    proc = LlavaProcessor(
        image_processor=improc,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
        image_token=image,
    )
    model = LlavaForConditionalGeneration(cfg)
    return model, proc, _vision_model_renamer("vision_tower")


def _build_qwen2_vl(seed: int):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLTextConfig,
        Qwen2VLVideoProcessor,
        Qwen2VLVisionConfig,
    )

    vs, ve, ip, vp = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
    image, video = vs + ip + ve, vs + vp + ve
    tok = _make_tokenizer(
        named={"image_token": ip, "video_token": vp, "vision_start_token": vs, "vision_end_token": ve},
        chat_template=_chat_template(image, video),
    )
    patch, merge, tpatch = 14, 2, 2
    head_dim = _TEXT_HIDDEN // _TEXT_HEADS
    mrope = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # 4, 6, 6: sums to head_dim/2
    assert sum(mrope) == head_dim // 2
    text = Qwen2VLTextConfig(
        **_text_kwargs(len(tok)),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
    )
    vision = Qwen2VLVisionConfig(
        depth=2,
        embed_dim=64,
        hidden_size=_TEXT_HIDDEN,
        num_heads=2,
        mlp_ratio=2,
        patch_size=patch,
        spatial_merge_size=merge,
        temporal_patch_size=tpatch,
    )
    cfg = Qwen2VLConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(ip),
        video_token_id=tok.convert_tokens_to_ids(vp),
        vision_start_token_id=tok.convert_tokens_to_ids(vs),
        vision_end_token_id=tok.convert_tokens_to_ids(ve),
        tie_word_embeddings=False,
    )
    _set_token_ids(cfg, tok)
    factor = patch * merge
    # 4 to 16 image tokens: min 2x2, max 4x4 merged patches (56 to 112 px).
    pixels = {"shortest_edge": (2 * factor) ** 2, "longest_edge": (4 * factor) ** 2}
    common = dict(
        size=pixels,
        patch_size=patch,
        temporal_patch_size=tpatch,
        merge_size=merge,
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
    )
    improc = Qwen2VLImageProcessor(**common)
    vidproc = Qwen2VLVideoProcessor(**common, min_frames=2, max_frames=8)
    proc = Qwen2VLProcessor(
        image_processor=improc, tokenizer=tok, video_processor=vidproc, chat_template=tok.chat_template
    )
    model = Qwen2VLForConditionalGeneration(cfg)
    return model, proc, None


def _build_llava_onevision(seed: int):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    image, video = "<image>", "<video>"
    tok = _make_tokenizer(
        named={"image_token": image, "video_token": video}, chat_template=_chat_template(image, video)
    )
    image_size, patch = 32, 8
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        vision_use_head=False,
    )
    text = Qwen2Config(**_text_kwargs(len(tok)))
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(image),
        video_token_index=tok.convert_tokens_to_ids(video),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    _set_token_ids(cfg, tok)
    improc = LlavaOnevisionImageProcessor(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
    )
    vidproc = LlavaOnevisionVideoProcessor(
        size={"height": image_size, "width": image_size}, image_mean=_IMAGE_MEAN, image_std=_IMAGE_STD
    )
    proc = LlavaOnevisionProcessor(
        image_processor=improc,
        tokenizer=tok,
        video_processor=vidproc,
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=tok.chat_template,
        image_token=image,
        video_token=video,
        vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(cfg)
    return model, proc, _vision_model_renamer("vision_tower")


def _build_mistral3(seed: int):
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
    )

    img, brk, end = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
    tok = _make_tokenizer(
        named={"image_token": img, "image_break_token": brk, "image_end_token": end},
        chat_template=_chat_template(img, None, user="[INST]", assistant="[/INST]"),
    )
    image_size, patch, merge = 64, 8, 2
    vision = PixtralVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=32,
        image_size=image_size,
        patch_size=patch,
    )
    text = MistralConfig(**_text_kwargs(len(tok)), sliding_window=None)
    cfg = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(img),
        spatial_merge_size=merge,
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )
    _set_token_ids(cfg, tok)
    improc = PixtralImageProcessor(
        size={"longest_edge": image_size},
        patch_size={"height": patch, "width": patch},
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
    )
    proc = PixtralProcessor(
        image_processor=improc,
        tokenizer=tok,
        patch_size=patch,
        spatial_merge_size=merge,
        chat_template=tok.chat_template,
        image_token=img,
        image_break_token=brk,
        image_end_token=end,
    )
    model = Mistral3ForConditionalGeneration(cfg)
    return model, proc, None


_BUILDERS: dict[str, Callable[[int], tuple[Any, Any, Callable[[str], str] | None]]] = {
    "llava": _build_llava,
    "qwen2_vl": _build_qwen2_vl,
    "llava_onevision": _build_llava_onevision,
    "mistral3": _build_mistral3,
}


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _marker_payload(arch: str, seed: int) -> dict[str, Any]:
    return {"arch": arch, "seed": seed, "version": _BUILD_VERSION}


def _is_complete(model_dir: pathlib.Path, arch: str, seed: int) -> bool:
    marker = model_dir / _MARKER
    try:
        return json.loads(marker.read_text()) == _marker_payload(arch, seed)
    except (OSError, ValueError):
        return False


def _build_into(arch: str, target: pathlib.Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)  # module construction draws from the global RNG; keep it stable
    model, proc, rename = _BUILDERS[arch](seed)
    model = model.to(torch.float32).eval()
    _redraw_weights(model, seed)
    model.save_pretrained(str(target))
    proc.save_pretrained(str(target))
    if rename is not None:
        _rename_safetensors(target, rename)
    _check_reload(model, target)


def build_tiny_model(arch: str, out_dir: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Build (or reuse if out_dir already holds a complete build) and return the model dir."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(_BUILDERS)}")
    out = pathlib.Path(out_dir).resolve()
    if _is_complete(out, arch, seed):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        _build_into(arch, tmp, seed)
        (tmp / _MARKER).write_text(json.dumps(_marker_payload(arch, seed)))  # last file written
        if out.exists():
            if _is_complete(out, arch, seed):  # another caller finished first
                return out
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process put a directory there in the meantime.
            if not _is_complete(out, arch, seed):
                raise
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
