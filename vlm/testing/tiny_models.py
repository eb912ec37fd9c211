"""Tiny random-weight VLM checkpoints, built offline for tests.

Each architecture is built from transformers config classes, with its own small byte-level
BPE tokenizer (made with the ``tokenizers`` library), a chat template, and the family's
processor, and saved in the checkpoint layout that hub checkpoints use (and vLLM loads).

Usage::

    from vlm.testing.tiny_models import SPECS, build_tiny_model
    model_dir = build_tiny_model("llava", tmp_dir)

or from a shell: ``python -m vlm.testing.tiny_models llava DIR``.

Weights are re-drawn with a large std (``_INIT_STD``) so greedy outputs depend on the image.
A build is deterministic for a given seed (about 0.2-0.5 s, 1-2.5 MB, float32).
``build_tiny_model`` writes into a private temporary directory next to ``out_dir`` and renames
it into place, so concurrent calls are safe; a directory that already holds a complete build
of the same arch, seed and recipe (marker file written last) is reused without importing
torch or transformers.

``SPECS[arch].image_token`` / ``.video_token`` is the text a prompt carries per image / video
(the processor expands it). Fuyu is the exception on the HF side: see ``SPECS["fuyu"].note``.
Fuyu's tokenizer is the SentencePiece-style variant ("▁" word prefix, ``<0xNN>`` byte
fallback); the others are byte-level BPE.

``warm_vllm_model_info_cache(model_dir)`` saves vLLM's cold-cache model inspection (a ~25 s
subprocess per architecture on 2 cores) for tests that start engines.
"""

from __future__ import annotations

import functools
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
    "llava_onevision": TinyModelSpec(
        "llava_onevision", "<image>", "<video>", True, "SigLIP + Qwen2, anyres grid pinpoints"
    ),
    "qwen2_vl": TinyModelSpec(
        "qwen2_vl",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
        True,
        "Qwen2-VL: M-RoPE; the processor expands <|image_pad|> / <|video_pad|>",
    ),
    "mistral3": TinyModelSpec(
        "mistral3", "[IMG]", None, True, "Pixtral vision + Mistral; [IMG] rows with [IMG_BREAK], [IMG_END]"
    ),
    "gemma3": TinyModelSpec(
        "gemma3",
        "<start_of_image>",
        None,
        True,
        "SigLIP + Gemma3; the processor expands <start_of_image> to"
        " '\\n\\n<start_of_image>' + <image_soft_token>*16 + '<end_of_image>\\n\\n'",
    ),
    "idefics3": TinyModelSpec(
        "idefics3", "<image>", None, True, "Idefics3: tiles with <row_i_col_j>, <global-img>, pixel shuffle"
    ),
    "fuyu": TinyModelSpec(
        "fuyu",
        "|SPEAKER|",
        None,
        False,
        "vLLM 0.32 has no native Fuyu (FuyuForCausalLM was removed in vLLM 0.25) and falls back to"
        " its Transformers backend (TransformersMultiModalForCausalLM). That backend calls"
        " FuyuProcessor(text='|SPEAKER|', images=[image]); transformers 5.19's FuyuProcessor"
        " always prepends its own |SPEAKER| (prepare_inputs_layout), so there are two image"
        " placeholders for one image and ProcessorMixin.get_text_with_replacements raises"
        " StopIteration -> 'ValueError: Failed to apply FuyuProcessor on data={'text':"
        " '|SPEAKER|', 'images': [...]}'. The engine starts (its multi-modal warmup fails with a"
        " warning only), but every request with an image fails. This comes from library code, not"
        " from this fixture. Closest arch that runs: mistral3 (Pixtral: native-resolution patch"
        " rows, each ended by a non-embedding break token, like Fuyu's |NEWLINE|)."
        " With HF directly, the text must NOT contain |SPEAKER| (FuyuProcessor adds one per"
        " image), so the chat template emits nothing for image parts; FuyuProcessor also drops"
        " chat_template, so use the tokenizer's.",
    ),
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


def _bpe_tokenizer(
    leading: list[str],
    extra_tokens: list[str],
    special_tokens: list[str],
    *,
    sentencepiece_style: bool,
    vocab_tokens: list[str] = (),
):
    """Train a small BPE on ``_CORPUS`` (deterministic) and add the given tokens.

    ``leading`` special tokens get the first ids, in order. ``special_tokens`` are added as
    special (skipped when decoding); ``extra_tokens`` as normal added tokens (e.g. literal
    newlines that some processors look up in the vocabulary).

    Byte-level (GPT-2 style, "Ġ" for spaces) by default. With ``sentencepiece_style``: a
    SentencePiece-like (legacy Llama) BPE: "▁" is prepended to the text and replaces spaces,
    ``<0xNN>`` byte-fallback tokens follow ``leading``, and ``vocab_tokens`` are plain vocabulary
    entries (not added tokens) that the pre-tokenizer isolates. So "|SPEAKER||NEWLINE|" encodes
    as ["▁", "|SPEAKER|", "|NEWLINE|"], as with Fuyu's own tokenizer (FuyuProcessor strips that
    leading "▁" off its image placeholders).
    """
    import re

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    lines = _CORPUS.splitlines(keepends=True)
    if sentencepiece_style:
        tok = Tokenizer(models.BPE(unk_token=_UNK, byte_fallback=True, fuse_unk=True, ignore_merges=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        if vocab_tokens:
            pattern = Regex("|".join(re.escape(t) for t in vocab_tokens))
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(pattern, "isolated"), metaspace])
        else:
            tok.pre_tokenizer = metaspace
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=_VOCAB_TARGET - 256,
            special_tokens=list(leading),
            initial_alphabet=sorted(set(_CORPUS.replace(" ", "")) | {"▁"}),
            show_progress=False,
        )
        tok.train_from_iterator(lines, trainer=trainer)
        # Re-number: leading specials, the 256 byte tokens, the learned pieces, vocab_tokens.
        data = json.loads(tok.to_str())
        vocab: dict[str, int] = data["model"]["vocab"]
        order = list(leading) + [f"<0x{i:02X}>" for i in range(256)]
        seen = set(order) | set(vocab_tokens)
        order += [t for t in sorted(vocab, key=vocab.__getitem__) if t not in seen]
        order += list(vocab_tokens)
        new_ids = {t: i for i, t in enumerate(order)}
        data["model"]["vocab"] = new_ids
        for added in data.get("added_tokens", []):
            added["id"] = new_ids[added["content"]]
        tok = Tokenizer.from_str(json.dumps(data))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_VOCAB_TARGET,
            special_tokens=list(leading),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(lines, trainer=trainer)
    if extra_tokens:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in extra_tokens])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens])
    return tok


def _chat_template(
    image_text: str, video_text: str | None, *, bos: bool = True, user: str = "USER", assistant: str = "ASSISTANT"
) -> str:
    """Jinja chat template: string content or content lists of text/image/video parts.

    Each image part becomes ``image_text`` and each video part ``video_text`` (the model's
    per-item placeholder text, which the processor then expands). Turns are
    ``"USER: ...\n"`` / ``"ASSISTANT: ...</s>\n"``; ``add_generation_prompt`` adds
    ``"ASSISTANT:"``.
    """
    # json.dumps gives a string literal that jinja also reads (double quotes, \n escapes).
    img = json.dumps(image_text)
    video_branch = ""
    if video_text:
        video_branch = (
            "{%- elif part['type'] == 'video' or part['type'] == 'video_url' -%}"
            "{{- " + json.dumps(video_text) + " -}}"
        )
    return (
        ("{{- bos_token -}}" if bos else "")
        + "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- '" + user + ": ' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- '" + assistant + ": ' -}}"
        "{%- else -%}{{- message['role'] | upper + ': ' -}}{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- elif part['type'] == 'image' or part['type'] == 'image_url' -%}{{- " + img + " -}}"
        + video_branch
        + "{%- endif -%}{%- endfor -%}{%- endif -%}"
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
    vocab_tokens: list[str] = (),
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
    # FuyuProcessor forces pad_token_id = 0: the SentencePiece-style variant starts with pad.
    leading = [pad, *(x for x in [unk] if x), bos, eos] if sentencepiece_style else [bos, eos, pad]
    if not sentencepiece_style and unk:
        leading.append(unk)
    backend = _bpe_tokenizer(
        leading,
        list(extra or []),
        [t for t in specials if t not in leading],
        sentencepiece_style=sentencepiece_style,
        vocab_tokens=list(vocab_tokens),
    )
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


def _text_kwargs(tok, **over) -> dict[str, Any]:
    kw = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
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
    text = LlamaConfig(**_text_kwargs(tok))
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
        **_text_kwargs(tok),
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
    vidproc = Qwen2VLVideoProcessor(**common, min_frames=2, max_frames=8, cap_pixels_per_frame=False)
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
    text = Qwen2Config(**_text_kwargs(tok))
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
        chat_template=_chat_template(img, None),
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
    text = MistralConfig(**_text_kwargs(tok), sliding_window=None)
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


def _build_gemma3(seed: int):
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    boi, eoi, soft = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    tok = _make_tokenizer(
        named={"boi_token": boi, "eoi_token": eoi, "image_token": soft},
        special=["<start_of_turn>", "<end_of_turn>"],
        # vLLM's Gemma3 processor looks these up as single vocabulary entries.
        extra=["\n", "\n\n", "\n\n\n", "\n\n\n\n"],
        chat_template=_chat_template(boi, None),
        bos="<bos>",
        eos="<eos>",
    )
    image_size, patch, tokens_per_image = 64, 8, 16  # 8x8 patches pooled to 4x4
    head_dim = _TEXT_HIDDEN // _TEXT_HEADS
    text = Gemma3TextConfig(
        **_text_kwargs(tok),
        query_pre_attn_scalar=head_dim,
        # Both layers sliding (the default for 2 layers), window > max_model_len. With a
        # full_attention layer, vLLM 0.32 and transformers 5.19 disagreed from the 3rd token.
        sliding_window=_MAX_POS,
        layer_types=["sliding_attention", "sliding_attention"],
    )
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        vision_use_head=False,
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tok.convert_tokens_to_ids(boi),
        eoi_token_index=tok.convert_tokens_to_ids(eoi),
        image_token_index=tok.convert_tokens_to_ids(soft),
        tie_word_embeddings=False,
    )
    _set_token_ids(cfg, tok)
    improc = Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=_IMAGE_MEAN, image_std=_IMAGE_STD
    )
    proc = Gemma3Processor(
        image_processor=improc, tokenizer=tok, chat_template=tok.chat_template, image_seq_length=tokens_per_image
    )
    model = Gemma3ForConditionalGeneration(cfg)
    return model, proc, _vision_model_renamer("vision_tower")


def _build_idefics3(seed: int):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    image = "<image>"
    structural = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    structural += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = _make_tokenizer(
        named={"image_token": image}, special=structural, chat_template=_chat_template(image, None)
    )
    tile, patch, scale = 32, 8, 2
    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=tile,
        patch_size=patch,
    )
    text = LlamaConfig(**_text_kwargs(tok))
    cfg = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids(image),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    _set_token_ids(cfg, tok)
    improc = Idefics3ImageProcessor(
        size={"longest_edge": 2 * tile},  # at most 2x2 tiles + the global image
        max_image_size={"longest_edge": tile},
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
    )
    proc = Idefics3Processor(
        image_processor=improc,
        tokenizer=tok,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=tok.chat_template,
    )
    model = Idefics3ForConditionalGeneration(cfg)
    return model, proc, None


def _build_fuyu(seed: int):
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuImageProcessor, FuyuProcessor

    speaker, newline, boa = "|SPEAKER|", "|NEWLINE|", "<0x04>"
    # FuyuProcessor puts |SPEAKER| in front of the text itself: the template emits nothing for
    # an image part (a |SPEAKER| in the text would be a second image placeholder).
    tok = _make_tokenizer(
        special=[boa],
        vocab_tokens=[speaker, newline],
        # FuyuProcessor also adds <s> itself (after the image placeholders): no BOS here.
        chat_template=_chat_template("", None, bos=False),
        sentencepiece_style=True,
        bos="<s>",
        eos="|ENDOFTEXT|",
    )
    image_size, patch = 32, 8
    cfg = FuyuConfig(
        vocab_size=len(tok),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=_TEXT_INTERMEDIATE,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_TEXT_HEADS,
        max_position_embeddings=_MAX_POS,
        image_size=image_size,
        patch_size=patch,
        num_channels=3,
        image_token_id=tok.convert_tokens_to_ids(speaker),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    improc = FuyuImageProcessor(
        size={"height": image_size, "width": image_size}, patch_size={"height": patch, "width": patch}
    )
    proc = FuyuProcessor(image_processor=improc, tokenizer=tok)
    proc.chat_template = tok.chat_template
    model = FuyuForCausalLM(cfg)
    return model, proc, None


_BUILDERS: dict[str, Callable[[int], tuple[Any, Any, Callable[[str], str] | None]]] = {
    "llava": _build_llava,
    "qwen2_vl": _build_qwen2_vl,
    "llava_onevision": _build_llava_onevision,
    "mistral3": _build_mistral3,
    "gemma3": _build_gemma3,
    "idefics3": _build_idefics3,
    "fuyu": _build_fuyu,
}


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _recipe_digest() -> str:
    """Changes whenever this file or the libraries that shape the output change."""
    from importlib.metadata import version

    h = hashlib.sha256(pathlib.Path(__file__).read_bytes())
    for dist in ("transformers", "tokenizers", "safetensors"):
        h.update(f"{dist}=={version(dist)}".encode())
    return h.hexdigest()[:16]


def _marker_payload(arch: str, seed: int) -> dict[str, Any]:
    return {"arch": arch, "seed": seed, "version": _BUILD_VERSION, "recipe": _recipe_digest()}


def _is_complete(model_dir: pathlib.Path, arch: str, seed: int) -> bool:
    marker = model_dir / _MARKER
    try:
        return json.loads(marker.read_text()) == _marker_payload(arch, seed)
    except (OSError, ValueError):
        return False


def _build_into(arch: str, target: pathlib.Path, seed: int) -> None:
    import torch

    # Every parameter is re-drawn from a private generator: the caller's global RNG state
    # is neither used for the result nor needs to be seeded.
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


def warm_vllm_model_info_cache(model_dir: str | os.PathLike) -> bool:
    """Best effort: fill vLLM's model-info cache for the architecture in ``model_dir``.

    On a cache miss, vLLM 0.32 inspects the model class in a fresh Python subprocess that
    imports vLLM again (about 25-30 s on a 2-core machine, once per architecture, cached under
    ``$VLLM_CACHE_ROOT/modelinfos``). Doing the same inspection in-process takes well under a
    second once vLLM is imported. Uses vLLM internals: returns False (and does nothing) if they
    changed.
    """
    try:
        import importlib.util

        from vllm.model_executor.models.registry import ModelRegistry, _LazyRegisteredModel, _ModelInfo

        archs = json.loads((pathlib.Path(model_dir) / "config.json").read_text()).get("architectures") or []
        for name in archs:
            entry = ModelRegistry.models.get(name)
            if not isinstance(entry, _LazyRegisteredModel):
                continue
            spec = importlib.util.find_spec(entry.module_name)
            if spec is None or not spec.origin:
                continue
            module_hash = entry._get_modelinfo_module_hash(pathlib.Path(spec.origin))
            if entry._load_modelinfo_from_cache(module_hash) is None:
                entry._save_modelinfo_to_cache(_ModelInfo.from_model_cls(entry.load_model_cls()), module_hash)
        return True
    except Exception:  # noqa: BLE001 - purely an optimisation
        return False


def main(argv: list[str] | None = None) -> int:
    """``python -m vlm.testing.tiny_models ARCH OUT_DIR``: build one checkpoint offline and
    print its directory (a complete build already there is reused). The compose file's ``init``
    service runs this to give ``up`` a model with no network."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlm.testing.tiny_models", description=main.__doc__)
    parser.add_argument("arch", choices=sorted(_BUILDERS))
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.arch, args.out_dir, seed=args.seed), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
