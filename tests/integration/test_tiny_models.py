"""Tiny random-weight VLM fixtures: build, load in transformers, and match vLLM greedy tokens.

The engine tests (``-m engine``) start one in-process vLLM engine per architecture, one at a
time, and free it before the next.
"""

from __future__ import annotations

import gc
from pathlib import Path
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vlm.testing.tiny_models import (
    ARCHITECTURES,
    SPECS,
    TinyModelSpec,
    build_tiny_model,
    warm_vllm_model_info_cache,
)

MAX_NEW_TOKENS = 8
PROMPT_TEXT = "What is in this image?"
VIDEO_ARCHS = [a for a in ARCHITECTURES if SPECS[a].video_token]
VLLM_ARCHS = [a for a in ARCHITECTURES if SPECS[a].runs_in_vllm]

_build_lock = threading.Lock()


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def model_dir(tiny_model_cache):
    def get(arch: str):
        with _build_lock:
            return build_tiny_model(arch, tiny_model_cache / arch)

    return get


def _image(seed: int, size=(40, 48)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _video(seed: int, frames: int = 4):
    rng = np.random.default_rng(1000 + seed)
    return rng.integers(0, 256, (frames, 48, 40, 3), dtype=np.uint8)


def _messages(kind: str, text: str = PROMPT_TEXT):
    return [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]


def _render(proc, messages) -> str:
    # FuyuProcessor cannot carry a chat template (its __init__ drops it): use the tokenizer's.
    owner = proc if getattr(proc, "chat_template", None) else proc.tokenizer
    return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


_HF_CACHE: dict = {}


def _load_hf(path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    key = str(path)
    if key not in _HF_CACHE:
        _HF_CACHE.clear()  # keep one model in memory
        proc = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        _HF_CACHE[key] = (proc, model)
    return _HF_CACHE[key]


def _hf_greedy(proc, model, text, **media) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) with greedy decoding; generation stops at EOS."""
    import torch

    inputs = proc(text=text, return_tensors="pt", **media)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt) :].tolist()


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def test_specs_cover_architectures():
    assert set(SPECS) == set(ARCHITECTURES)
    for arch, spec in SPECS.items():
        assert isinstance(spec, TinyModelSpec) and spec.arch == arch
        if not spec.runs_in_vllm:
            assert spec.note, f"{arch}: say why it cannot run in vLLM"


def test_unknown_arch_rejected(tmp_path):
    with pytest.raises(ValueError):
        build_tiny_model("no_such_arch", tmp_path / "x")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_build_is_deterministic_small_and_cached(arch, model_dir, tmp_path):
    first = model_dir(arch)
    t0 = time.perf_counter()
    again = build_tiny_model(arch, tmp_path / "again")
    build_s = time.perf_counter() - t0
    assert build_s < 20.0, f"{arch} build took {build_s:.2f}s"  # ~0.2-0.5 s unloaded
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), f"{arch}: {name} differs"
    total = sum(f.stat().st_size for f in first.iterdir())
    assert total < 4 * 2**20, f"{arch} is {total} bytes"
    # A complete build is reused, not rewritten.
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_tiny_model(arch, tmp_path / "again") == again
    assert time.perf_counter() - t0 < 1.0
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    # Another seed gives other weights.
    other = build_tiny_model(arch, tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_concurrent_builds(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "a", tmp_path / "c"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda d: build_tiny_model("llava", d), dirs))
    assert [r.name for r in results] == ["a", "b", "a", "c"]
    ref = (results[1] / "model.safetensors").read_bytes()
    for r in results:
        assert (r / "model.safetensors").read_bytes() == ref
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary dirs left behind"


def test_vision_tower_saved_in_hub_layout(model_dir):
    from safetensors import safe_open

    for arch in ("llava", "llava_onevision", "gemma3"):
        with safe_open(str(model_dir(arch) / "model.safetensors"), framework="pt") as f:
            towers = [k for k in f.keys() if "vision_tower" in k]
        assert towers and all(k.startswith("vision_tower.vision_model.") for k in towers), arch


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokenizer_and_chat_template(arch, model_dir):
    spec = SPECS[arch]
    proc, _ = _load_hf(model_dir(arch))
    tok = proc.tokenizer
    assert 300 <= len(tok) <= 1200
    assert tok.bos_token and tok.eos_token and tok.pad_token
    for token in filter(None, (spec.image_token, spec.video_token)):
        ids = tok.encode(token, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids).strip() == token
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "alpha"}, {"type": "image"}, {"type": "text", "text": "bravo"}]
            + ([{"type": "video"}] if spec.video_token else []),
        },
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "charlie"}]},
    ]
    text = _render(proc, messages)
    # FuyuProcessor adds |SPEAKER| itself: its template emits nothing for an image part.
    assert text.count(spec.image_token) == (0 if arch == "fuyu" else 2)
    if spec.video_token:
        assert text.count(spec.video_token) == 1
    assert "be brief" in text and "yes" + tok.eos_token in text
    assert text.index("alpha") < text.index("bravo") < text.index("charlie")
    assert text.endswith("ASSISTANT:")
    owner = proc if getattr(proc, "chat_template", None) else proc.tokenizer
    no_prompt = owner.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not no_prompt.endswith("ASSISTANT:")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_generate_depends_on_image(arch, model_dir):
    proc, model = _load_hf(model_dir(arch))
    text = _render(proc, _messages("image"))
    prompt, out_a = _hf_greedy(proc, model, text, images=_image(0))
    _, out_b = _hf_greedy(proc, model, text, images=_image(1))
    n_placeholders = sum(1 for t in prompt if t == _placeholder_id(arch, proc))
    assert 1 <= n_placeholders <= 128, n_placeholders
    assert len(prompt) < 200
    assert out_a and out_b
    assert out_a != out_b, f"{arch}: greedy output does not depend on the image"


@pytest.mark.parametrize("arch", VIDEO_ARCHS)
def test_hf_generate_depends_on_video(arch, model_dir):
    proc, model = _load_hf(model_dir(arch))
    text = _render(proc, _messages("video", "What happens?"))
    prompt, out_a = _hf_greedy(proc, model, text, videos=_video(0))
    _, out_b = _hf_greedy(proc, model, text, videos=_video(1))
    video_id = proc.tokenizer.convert_tokens_to_ids(proc.video_token)
    assert 1 <= prompt.count(video_id) <= 128
    assert out_a != out_b, f"{arch}: greedy output does not depend on the video"


def _placeholder_id(arch: str, proc) -> int:
    """The token id the processor repeats for each image embedding."""
    if arch == "fuyu":
        return proc.image_token_id
    if arch == "gemma3":
        return proc.tokenizer.image_token_id  # <image_soft_token>
    return proc.tokenizer.convert_tokens_to_ids(proc.image_token)


def test_fuyu_processor_layout(model_dir):
    """FuyuProcessor adds |SPEAKER| itself: rows of |SPEAKER| ended by |NEWLINE|, then <s>."""
    proc, _ = _load_hf(model_dir("fuyu"))
    text = _render(proc, _messages("image"))
    assert "|SPEAKER|" not in text
    ids = proc(text=text, images=_image(0), return_tensors="pt")["input_ids"][0].tolist()
    tok = proc.tokenizer
    spk, nl = tok.convert_tokens_to_ids("|SPEAKER|"), tok.convert_tokens_to_ids("|NEWLINE|")
    assert ids[:5] == [spk] * 4 + [nl] and ids.count(spk) == 16 and ids.count(nl) == 4
    assert ids[20] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<0x04>")


# ---------------------------------------------------------------------------------------------
# vLLM (CPU, in-process engine)
# ---------------------------------------------------------------------------------------------


def _free_engine(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


@pytest.mark.engine
@pytest.mark.parametrize("arch", VLLM_ARCHS)
def test_vllm_greedy_matches_hf(arch, model_dir, monkeypatch, record_property):
    path = model_dir(arch)
    spec = SPECS[arch]
    proc, model = _load_hf(path)
    image_text = _render(proc, _messages("image"))
    hf_prompt, hf_out = _hf_greedy(proc, model, image_text, images=_image(0))
    cases = [({"image": _image(0)}, image_text, hf_prompt, hf_out)]
    if spec.video_token:
        video_text = _render(proc, _messages("video", "What happens?"))
        v_prompt, v_out = _hf_greedy(proc, model, video_text, videos=_video(0))
        cases.append(({"video": _video(0)}, video_text, v_prompt, v_out))

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read lazily by vLLM
    from vllm import LLM, SamplingParams

    warm_vllm_model_info_cache(path)  # else a cold cache costs a ~25 s subprocess per arch
    t0 = time.perf_counter()
    llm = LLM(
        model=str(path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=64 * 2**20,
        limit_mm_per_prompt={"image": 1, **({"video": 1} if spec.video_token else {})},
        seed=0,
    )
    start_s = time.perf_counter() - t0
    record_property("engine_start_s", round(start_s, 2))
    print(f"\n{arch}: vLLM engine start {start_s:.1f}s")
    try:
        params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)
        for mm_data, text, want_prompt, want_out in cases:
            (res,) = llm.generate({"prompt": text, "multi_modal_data": mm_data}, params, use_tqdm=False)
            assert list(res.prompt_token_ids) == want_prompt, f"{arch} {list(mm_data)}: prompt differs"
            assert list(res.outputs[0].token_ids) == want_out, f"{arch} {list(mm_data)}: tokens differ"
    finally:
        _free_engine(llm)


@pytest.mark.engine
def _fuyu_canary(path: str) -> tuple[str, str]:
    """Runs in a fresh process: loading Fuyu into vLLM patches HF's Persimmon classes in place
    (vLLM's Transformers backend wraps them for torch.compile), which would break later tiny-model
    builds in the test process."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    proc, _ = _load_hf(Path(path))
    warm_vllm_model_info_cache(Path(path))
    llm = LLM(
        model=path,
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=64 * 2**20,
        limit_mm_per_prompt={"image": 1},
    )
    try:
        prompt = {"prompt": _render(proc, _messages("image")), "multi_modal_data": {"image": _image(0)}}
        try:
            llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
        except ValueError as e:
            return str(e), type(e.__cause__).__name__
        return "", ""
    finally:
        _free_engine(llm)


def test_fuyu_still_fails_in_vllm(model_dir):
    """Canary for SPECS['fuyu'].runs_in_vllm = False: fails once vLLM/transformers fix it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    assert not SPECS["fuyu"].runs_in_vllm
    path = model_dir("fuyu")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        message, cause = pool.submit(_fuyu_canary, str(path)).result(timeout=600)
    assert "Failed to apply FuyuProcessor" in message
    assert cause == "StopIteration"

