"""Cost of the item content digest (`vlm.digest.item_digest`), per MiB of features.

The model service recomputes the digest of every item that arrives with fields (the hash keys
its feature store and vLLM's caches, so it is verified, not trusted), and the preprocessor
computes it once per processed item. This measures that cost against the serialisation work
the same bytes already cost: `codec.encode_wire` (the worker's encoding) and a plain
`bytes(...)` copy of the tensor memory, all in one run, on typical item shapes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, log, write_results

NAME = "digest"

#: (label, shape, dtype name): LLaVA 336² pixels, Qwen2-VL 1024×768 patch rows, a 4-frame video.
SHAPES = (
    ("llava image 3x336x336", (3, 336, 336), "float32"),
    ("llava image 3x336x336 bf16", (3, 336, 336), "bfloat16"),
    ("qwen2-vl 1024x768 rows", (4012, 1176), "float32"),
    ("video 16x3x336x336 bf16", (16, 3, 336, 336), "bfloat16"),
)


def _best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(*, quick: bool = False, out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    import torch

    from vlm.codec import encode_wire
    from vlm.digest import item_digest
    from vlm.types import FieldLayout, ItemField, Modality

    torch.manual_seed(0)
    repeat = 3 if quick else 15
    rows = []
    for label, shape, dtype in SHAPES:
        t = torch.randn(shape).to(getattr(torch, dtype))
        fields = {"pixel_values": ItemField(t, FieldLayout.BATCHED)}
        mib = t.numel() * t.element_size() / (1 << 20)
        digest_s = _best_seconds(lambda: item_digest(Modality.IMAGE, fields), repeat)
        encode_s = _best_seconds(lambda: encode_wire(t), repeat)
        copy_s = _best_seconds(lambda: bytes(t.reshape(-1).view(torch.uint8).numpy()), repeat)
        rows.append({
            "item": label, "mib": round(mib, 3),
            "digest_ms": digest_s * 1e3, "digest_ms_per_mib": digest_s * 1e3 / mib,
            "digest_gib_s": mib / 1024 / digest_s,
            "encode_ms": encode_s * 1e3, "copy_ms": copy_s * 1e3,
            "digest_vs_copy": digest_s / copy_s,
        })
        log(f"{label}: {mib:.2f} MiB, digest {digest_s * 1e3:.2f} ms ({digest_s * 1e3 / mib:.3f} ms/MiB)")
    md = ["## Item digest (BLAKE3) cost", "",
          "Best of %d runs, one thread. `copy` is one `bytes()` copy of the same memory." % repeat, "",
          "| item | MiB | digest ms | ms / MiB | GiB/s | encode_wire ms | copy ms | digest / copy |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['item']} | {r['mib']:.2f} | {r['digest_ms']:.2f} | {r['digest_ms_per_mib']:.3f} | "
                  f"{r['digest_gib_s']:.2f} | {r['encode_ms']:.2f} | {r['copy_ms']:.2f} | {r['digest_vs_copy']:.2f}× |")
    data = {"name": NAME, "quick": quick, "repeat": repeat, "rows": rows}
    write_results(out_dir, NAME, data, "\n".join(md))
    print("\n".join(md))
    return data
