"""Preprocessing throughput: our preprocessor service over gRPC vs. the HF processor in-process.

For two processor families on 1024×768 JPEG photos (synthetic, deterministic, quality 90):

* **LLaVA-1.5 style**: CLIP image processor, resize shortest edge to 336 + centre crop 336 →
  576 image tokens;
* **Qwen2-VL**: dynamic resolution with the HF default pixel limits (min 56·56, max 28·28·1280)
  → 1036×756 → 999 image tokens.

The tiny test fixtures (`vlm.testing.tiny_models`) use 32-px / ≤112-px images, so each is
copied and its processor config (and, for LLaVA, the vision config that fixes the token count)
rewritten to the realistic sizes above. Weights do not matter: the preprocessor never loads
them.

Measured in one process, one after another:

1. **baseline**: `AutoProcessor.from_pretrained(dir)` (transformers' default backend, the
   torchvision "fast" image processor where one exists) called as
   `processor(images=pil, text=prompt, return_tensors="pt")` in a loop, JPEG decode included;
   in the full run it is measured before *and* after the service runs (the mean is the
   reference; the drift between the two shows how noisy the machine was);
2. **baseline as vLLM calls it** (Qwen2-VL): the same call plus `do_rescale=False,
   do_normalize=False`, which vLLM 0.32 adds (it normalises Qwen2-VL pixels on the device, so
   its processor returns uint8 and does less CPU work); the service is also compared to it;
3. **service**: `PreprocessorApp` on loopback with `workers=1` and `workers=2`, each at
   `--worker-depth` 1 (the default) and 2 (pipelined), driven by
   `PreprocessorClient.preprocess` with 2×workers requests in flight, one distinct JPEG per
   request (a pool cycled once exhausted; `cache_bytes=0`, so no processor-cache hits).

Each run is time-boxed (after a warm-up). Reported: images/s, p50/p95 latency, the ratio to the
HF baseline, and (service) where the time went: queue wait, decode, vLLM processing, worker
total, and the rest (pipe transfer + tensor conversion + gRPC + client).

    python -m bench.preprocess_throughput [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_OUT,
    fmt,
    fmt_ratio,
    latency_summary,
    log,
    machine_info,
    md_table,
    percentile,
    ratio,
    synthetic_jpegs,
    write_results,
)

NAME = "preprocess_throughput"

#: Long enough for a 999-token Qwen2-VL image plus text (the tiny configs allow 4096 positions).
MAX_MODEL_LEN = 2048

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Settings:
    #: Seconds each timed run lasts (requests already in flight are completed).
    duration_s: float
    #: Minimum requests per timed run, whatever the duration.
    min_requests: int
    #: Distinct JPEGs generated before measuring (cycled if a run needs more).
    pool: int
    #: Warm-up requests per request slot (service) / in total (baseline).
    warmup: int
    #: Baseline measured before and after the service runs (2) or once (1).
    baseline_runs: int
    workers: tuple[int, ...] = (1, 2)
    #: `--worker-depth` values measured for each worker count (1: the default; 2: pipelined).
    depths: tuple[int, ...] = (1, 2)
    in_flight_per_worker: int = 2
    image_size: tuple[int, int] = (1024, 768)
    jpeg_quality: int = 90


QUICK = Settings(duration_s=1.5, min_requests=4, pool=12, warmup=1, baseline_runs=1)
FULL = Settings(duration_s=12.0, min_requests=16, pool=64, warmup=2, baseline_runs=2)


@dataclass(frozen=True)
class Family:
    key: str
    arch: str  # tiny fixture architecture
    label: str
    prompt: str
    #: Kwargs vLLM adds when it calls this family's HF processor. vLLM 0.32 moves rescale and
    #: normalisation of Qwen2-VL pixels to the device (`mm_device_do_normalize`), so its
    #: processor returns uint8 and does less CPU work than a plain HF call. Checked against the
    #: service's output dtype (`vllm_kwargs_confirmed`).
    vllm_hf_kwargs: tuple[tuple[str, Any], ...] = ()


FAMILIES = (
    Family(
        "llava",
        "llava",
        "LLaVA-1.5 style (CLIP 336)",
        "USER: <image>\nDescribe this picture in detail. ASSISTANT:",
    ),
    Family(
        "qwen2_vl",
        "qwen2_vl",
        "Qwen2-VL (default min/max pixels)",
        "<|vision_start|><|image_pad|><|vision_end|>Describe this picture in detail.",
        vllm_hf_kwargs=(("do_rescale", False), ("do_normalize", False)),
    ),
)


# ---------------------------------------------------------------------------------------------
# Benchmark fixtures: tiny checkpoints with realistic processor configs
# ---------------------------------------------------------------------------------------------


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_bench_fixture(arch: str, root: Path) -> Path:
    """A copy of the tiny `arch` fixture whose processor works at realistic image sizes."""
    from vlm.testing.tiny_models import build_tiny_model

    tiny = build_tiny_model(arch, root / f"tiny-{arch}")
    dst = root / f"{arch}-bench"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(tiny, dst)
    # Not the tiny build any more: drop its completion marker so nothing mistakes it for one.
    for marker in dst.glob(".tiny_model_complete*"):
        marker.unlink()

    if arch == "llava":
        # llava-hf/llava-1.5-*: CLIP ViT-L/14 at 336 px → (336/14)² = 576 image tokens.
        def proc(cfg: dict[str, Any]) -> None:
            ip = cfg["image_processor"]
            ip["size"] = {"shortest_edge": 336}
            ip["crop_size"] = {"height": 336, "width": 336}
            ip["image_mean"], ip["image_std"] = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
            cfg["patch_size"] = 14

        def model(cfg: dict[str, Any]) -> None:
            cfg["vision_config"]["image_size"] = 336
            cfg["vision_config"]["patch_size"] = 14
            cfg["image_seq_length"] = 576

        _edit_json(dst / "processor_config.json", proc)
        _edit_json(dst / "config.json", model)
    elif arch == "qwen2_vl":
        # Qwen2VLImageProcessor defaults: min_pixels 56·56, max_pixels 28·28·1280.
        def proc(cfg: dict[str, Any]) -> None:
            for sub in ("image_processor", "video_processor"):
                if sub in cfg:
                    cfg[sub]["size"] = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
                    cfg[sub]["image_mean"], cfg[sub]["image_std"] = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        _edit_json(dst / "processor_config.json", proc)
    else:
        raise ValueError(f"no benchmark variant for {arch!r}")
    return dst


# ---------------------------------------------------------------------------------------------
# Baseline: the HF processor in this process
# ---------------------------------------------------------------------------------------------


def _load_hf_processor(model_dir: Path) -> tuple[Any, float]:
    from transformers import AutoProcessor

    t0 = time.perf_counter()
    proc = AutoProcessor.from_pretrained(str(model_dir))
    return proc, time.perf_counter() - t0


def _hf_one(proc: Any, prompt: str, jpeg: bytes, kwargs: dict[str, Any] | None = None) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        img = im.convert("RGB")
    return proc(images=img, text=prompt, return_tensors="pt", **(kwargs or {}))


def hf_describe(proc: Any, prompt: str, jpeg: bytes) -> dict[str, Any]:
    ip = proc.image_processor
    out = _hf_one(proc, prompt, jpeg)
    backends = [c.__name__ for c in type(ip).__mro__ if c.__name__.endswith("Backend")]
    return {
        "image_processor": type(ip).__name__,
        "backend": backends[0] if backends else None,
        "prompt_tokens": int(out["input_ids"].shape[-1]),
        "pixel_values": {"shape": list(out["pixel_values"].shape), "dtype": str(out["pixel_values"].dtype)},
    }


def hf_run(
    proc: Any, prompt: str, jpegs: list[bytes], s: Settings, start: int = 0,
    kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sequential loop over distinct images, time-boxed."""
    for i in range(s.warmup * 2):
        _hf_one(proc, prompt, jpegs[(start + i) % len(jpegs)], kwargs)
    lat: list[float] = []
    t_start = time.perf_counter()
    i = start
    while True:
        t = time.perf_counter()
        _hf_one(proc, prompt, jpegs[i % len(jpegs)], kwargs)
        lat.append(time.perf_counter() - t)
        i += 1
        if len(lat) >= s.min_requests and time.perf_counter() - t_start >= s.duration_s:
            break
    elapsed = time.perf_counter() - t_start
    return {
        "images": len(lat),
        "distinct_images": min(len(lat), len(jpegs)),
        "seconds": elapsed,
        "images_per_s": len(lat) / elapsed,
        "latency": latency_summary(lat),
    }


# ---------------------------------------------------------------------------------------------
# Our service over gRPC on loopback
# ---------------------------------------------------------------------------------------------


def _recording_metrics():
    from preprocessor_svc.metrics import PreprocessorMetrics

    class RecordingMetrics(PreprocessorMetrics):
        """The service's own metrics, also keeping each request's PreprocessMetrics."""

        def __init__(self) -> None:
            super().__init__()
            self.records: list[Any] = []

        def record(self, result) -> None:  # noqa: ANN001 - a pool.PooledResult
            super().record(result)
            self.records.append(result)

    return RecordingMetrics()


def _breakdown(records: list[Any], latencies: list[float]) -> dict[str, Any]:
    """Medians (ms) of where a request's time went, from the worker's own metrics."""

    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) * 1000.0 if xs else None

    queue = [r.queue_seconds for r in records]
    decode = [sum(m.decode_seconds for m in r.metrics.modalities.values()) for r in records]
    process = [r.metrics.process_seconds for r in records]
    encode = [r.encode_seconds for r in records]
    worker = [r.metrics.total_seconds + r.encode_seconds for r in records]
    out = {
        "queue_ms_p50": med(queue),
        "decode_ms_p50": med(decode),
        "vllm_process_ms_p50": med(process),
        "encode_ms_p50": med(encode),
        "worker_total_ms_p50": med(worker),
        "feature_bytes_per_image": (
            statistics.median([sum(m.feature_bytes for m in r.metrics.modalities.values()) for r in records])
            if records
            else None
        ),
        "prompt_tokens": records[0].metrics.prompt_tokens if records else None,
        "cache_hits": sum(r.metrics.cache_hits for r in records),
        "workers_used": sorted({r.worker for r in records}),
    }
    lat_p50 = percentile([x * 1000.0 for x in latencies], 50)
    if lat_p50 is not None and out["worker_total_ms_p50"] is not None:
        # Pipe transfer + framing + gRPC + client conversion.
        out["rest_ms_p50"] = lat_p50 - out["worker_total_ms_p50"] - (out["queue_ms_p50"] or 0.0)
    return out


async def service_run(
    model_dir: Path, prompt: str, jpegs: list[bytes], workers: int, s: Settings, depth: int = 1
) -> dict[str, Any]:
    from preprocessor_svc.app import PreprocessorApp
    from preprocessor_svc.pool import PoolConfig
    from preprocessor_svc.processing import ProcessorConfig
    from vlm.client import PreprocessorClient
    from vlm.server import ServerOptions
    from vlm.types import Media, Modality, PromptInput

    config = ProcessorConfig(model=str(model_dir), max_model_len=MAX_MODEL_LEN, cache_bytes=0)
    pool = PoolConfig(workers=workers, max_queue=max(64, 4 * workers * s.in_flight_per_worker),
                      worker_depth=depth)
    metrics = _recording_metrics()
    t0 = time.perf_counter()
    app = await PreprocessorApp.start(config, pool, ServerOptions(metrics_port=None, grace_s=0.5), metrics)
    start_s = time.perf_counter() - t0
    in_flight = workers * s.in_flight_per_worker
    try:
        async with PreprocessorClient(f"127.0.0.1:{app.grpc.port}") as client:
            counter = itertools.count()

            fields: dict[str, Any] = {}

            async def one() -> tuple[float, int]:
                jpeg = jpegs[next(counter) % len(jpegs)]
                req = PromptInput(text=prompt, media=(Media(Modality.IMAGE, jpeg, "image/jpeg"),))
                t = time.perf_counter()
                out = await client.preprocess(req)
                dt = time.perf_counter() - t
                if not fields and out.items:
                    for name, f in (out.items[0].fields or {}).items():
                        fields[name] = {"shape": list(f.data.shape), "dtype": str(f.data.dtype)}
                return dt, len(out.token_ids)

            await asyncio.gather(*(one() for _ in range(in_flight * s.warmup)))
            metrics.records.clear()

            lat: list[float] = []
            tokens: set[int] = set()
            t_start = time.perf_counter()
            deadline = t_start + s.duration_s

            async def slot() -> None:
                while time.perf_counter() < deadline or len(lat) < s.min_requests:
                    dt, n = await one()
                    lat.append(dt)
                    tokens.add(n)

            await asyncio.gather(*(slot() for _ in range(in_flight)))
            elapsed = time.perf_counter() - t_start
    finally:
        await app.close()
    return {
        "workers": workers,
        "worker_depth": depth,
        "in_flight": in_flight,
        "start_s": start_s,
        "worker_build_s": list(app.preprocessor.build_seconds),
        "images": len(lat),
        "distinct_images": min(len(lat), len(jpegs)),
        "seconds": elapsed,
        "images_per_s": len(lat) / elapsed,
        "latency": latency_summary(lat),
        "prompt_tokens": sorted(tokens),
        "fields": fields,
        "breakdown": _breakdown(list(metrics.records), lat),
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


async def _family_run(fam: Family, root: Path, jpegs: list[bytes], s: Settings) -> dict[str, Any]:
    import torch

    model_dir = build_bench_fixture(fam.arch, root)
    proc, load_s = _load_hf_processor(model_dir)
    desc = hf_describe(proc, fam.prompt, jpegs[0])
    log(f"{fam.key}: HF {desc['image_processor']} ({desc['backend']}), {desc['prompt_tokens']} "
        f"prompt tokens, pixel_values {desc['pixel_values']['shape']}")
    baselines = [hf_run(proc, fam.prompt, jpegs, s)]
    log(f"{fam.key}: HF in-process {baselines[0]['images_per_s']:.1f} img/s")
    services = []
    for w in s.workers:
        for depth in s.depths:
            r = await service_run(model_dir, fam.prompt, jpegs, w, s, depth)
            log(f"{fam.key}: service workers={w} depth={depth} {r['images_per_s']:.1f} img/s "
                f"(start {r['start_s']:.1f}s)")
            services.append(r)
    if s.baseline_runs > 1:
        baselines.append(hf_run(proc, fam.prompt, jpegs, s, start=len(jpegs) // 2))
        log(f"{fam.key}: HF in-process (again) {baselines[-1]['images_per_s']:.1f} img/s")
    ref = statistics.mean(b["images_per_s"] for b in baselines)
    matched = None
    if fam.vllm_hf_kwargs:
        kw = dict(fam.vllm_hf_kwargs)
        matched = hf_run(proc, fam.prompt, jpegs, s, kwargs=kw)
        out = _hf_one(proc, fam.prompt, jpegs[0], kw)
        matched["kwargs"] = kw
        matched["pixel_values_dtype"] = str(out["pixel_values"].dtype)
        matched["ratio_vs_hf"] = ratio(matched["images_per_s"], ref)
        log(f"{fam.key}: HF in-process as vLLM calls it {kw}: {matched['images_per_s']:.1f} img/s")
    for r in services:
        r["ratio_vs_hf"] = ratio(r["images_per_s"], ref)
        r["ratio_vs_hf_as_vllm"] = ratio(r["images_per_s"], matched["images_per_s"]) if matched else None
        r["tokens_match_hf"] = r["prompt_tokens"] == [desc["prompt_tokens"]]
        pv = r["fields"].get("pixel_values", {}).get("dtype")
        r["vllm_kwargs_confirmed"] = (pv == "torch.uint8") == bool(fam.vllm_hf_kwargs) if pv else None
    drift = None
    if len(baselines) > 1:
        drift = baselines[-1]["images_per_s"] / baselines[0]["images_per_s"] - 1.0
    return {
        "family": fam.key,
        "label": fam.label,
        "prompt": fam.prompt,
        "hf": {**desc, "load_s": load_s, "torch_threads": torch.get_num_threads()},
        "baseline": {"images_per_s": ref, "runs": baselines, "drift": drift},
        "baseline_as_vllm": matched,
        "service": services,
    }


def render_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        "## Preprocessing throughput: preprocessor service (gRPC, loopback) vs. HF processor in-process",
        "",
        f"{s['image_size'][0]}×{s['image_size'][1]} synthetic JPEG photos (quality {s['jpeg_quality']}, "
        f"mean {data['images']['mean_kb']:.0f} KB), one image per request, "
        f"{s['duration_s']:g} s per run{' (QUICK: smoke settings)' if data['quick'] else ''}; "
        f"{data['machine']['cpu_count']} CPUs, load average {fmt(data['machine']['loadavg_1m'], 2)} at start. "
        "*vs HF*: ratio to the plain HF processor call (the baseline); *vs HF as vLLM calls it*: "
        "ratio to the HF call with the kwargs vLLM adds (same CPU work as the service's processor).",
        "",
    ]
    rows = []
    for fam in data["families"]:
        b = fam["baseline"]
        b_lat = b["runs"][0]["latency"]
        note = "" if b["drift"] is None else f" (drift {b['drift'] * 100:+.0f}%)"
        m = fam.get("baseline_as_vllm")
        rows.append([
            fam["label"], f"HF {fam['hf']['image_processor']} in-process{note}", "–", "1",
            fmt(b["images_per_s"]), fmt(b_lat["p50_ms"]), fmt(b_lat["p95_ms"]), "1.00×",
            fmt_ratio(ratio(b["images_per_s"], m["images_per_s"])) if m else "–",
        ])
        if m:
            kw = ", ".join(f"{k}={v}" for k, v in m["kwargs"].items())
            rows.append([
                fam["label"], f"HF in-process as vLLM calls it ({kw})", "–", "1",
                fmt(m["images_per_s"]), fmt(m["latency"]["p50_ms"]), fmt(m["latency"]["p95_ms"]),
                fmt_ratio(m["ratio_vs_hf"]), "1.00×",
            ])
        for r in fam["service"]:
            rows.append([
                fam["label"], f"preprocessor service, gRPC, --worker-depth {r.get('worker_depth', 1)}",
                r["workers"], r["in_flight"],
                fmt(r["images_per_s"]), fmt(r["latency"]["p50_ms"]), fmt(r["latency"]["p95_ms"]),
                fmt_ratio(r["ratio_vs_hf"]), fmt_ratio(r["ratio_vs_hf_as_vllm"]),
            ])
    lines.append(md_table(
        ["processor", "path", "workers", "in flight", "images/s", "p50 ms", "p95 ms", "vs HF",
         "vs HF as vLLM calls it"], rows
    ))
    lines += ["", "Where a service request's time went (medians, ms; *rest* = pipe transfer, tensor "
              "conversion, protobuf, gRPC and client):", ""]
    rows = []
    for fam in data["families"]:
        for r in fam["service"]:
            bd = r["breakdown"]
            pv = r["fields"].get("pixel_values", {})
            rows.append([
                fam["label"], f"{r['workers']} (depth {r.get('worker_depth', 1)})",
                fmt(bd["queue_ms_p50"]), fmt(bd["decode_ms_p50"]),
                fmt(bd["vllm_process_ms_p50"]), fmt(bd["worker_total_ms_p50"]), fmt(bd.get("rest_ms_p50")),
                f"{fmt((bd['feature_bytes_per_image'] or 0) / 2**20, 2)} "
                f"({str(pv.get('dtype', '?')).removeprefix('torch.')})",
                ",".join(map(str, r["prompt_tokens"])),
                "yes" if r["tokens_match_hf"] else "NO",
            ])
    lines.append(md_table(
        ["processor", "workers", "queue", "decode", "vLLM processing", "worker total", "rest",
         "pixels MiB/img (dtype)", "prompt tokens", "= HF tokens"], rows
    ))
    return "\n".join(lines) + "\n"


def run(*, quick: bool = False, out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    s = QUICK if quick else FULL
    t_all = time.perf_counter()
    log(f"preprocess: generating {s.pool} synthetic {s.image_size[0]}x{s.image_size[1]} JPEGs")
    jpegs = synthetic_jpegs(s.pool, s.image_size, quality=s.jpeg_quality)
    data: dict[str, Any] = {
        "benchmark": NAME,
        "quick": quick,
        "settings": asdict(s),
        "machine": machine_info(),
        "images": {
            "count": len(jpegs),
            "mean_kb": statistics.mean(len(j) for j in jpegs) / 1024,
        },
        "families": [],
    }

    async def all_families() -> None:
        # One event loop for every gRPC server and channel of the run.
        with tempfile.TemporaryDirectory(prefix="vlm-bench-pre-") as tmp:
            for fam in FAMILIES:
                data["families"].append(await _family_run(fam, Path(tmp), jpegs, s))

    asyncio.run(all_families())
    data["total_s"] = time.perf_counter() - t_all
    md = render_markdown(data)
    paths = write_results(out_dir, NAME, data, md)
    print(md, flush=True)
    log(f"preprocess: done in {data['total_s']:.0f}s; wrote {paths[0]} and {paths[1]}")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.preprocess_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke-test settings (< 2 min)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    run(quick=args.quick, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
