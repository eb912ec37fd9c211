"""Session-wide test settings: offline, CPU-friendly vLLM defaults."""

from __future__ import annotations

import os

# No hub access here; everything is built offline in temp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vLLM on CPU sizes the KV cache from NUMA node 0 unless told (see ENVIRONMENT.md).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
