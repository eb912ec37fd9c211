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

Measured in alternating rounds (the machine is shared and noisy: each ratio compares runs a
few seconds apart):

1. **baseline**: `AutoProcessor.from_pretrained(dir)` (transformers' default backend, the
   torchvision "fast" image processor where one exists) called in this process as
   `processor(images=pil, text=prompt, return_tensors="pt")` in a loop, JPEG decode included;
2. **baseline as vLLM calls it** (Qwen2-VL): the same call plus `do_rescale=False,
   do_normalize=False`, which vLLM 0.32 adds (it normalises Qwen2-VL pixels on the device, so
   its processor returns uint8 and does less CPU work); the service is also compared to it;
3. **service**: `python -m preprocessor_svc.main` (what `vlm serve-preprocessor` runs) as its
   own process tree, with `--workers` 1 and 2, each at `--worker-depth` 1 (idle workers only)
   and 2 (pipelined, the default), driven from this process by `PreprocessorClient.preprocess` with 2 × workers
   requests in flight, one distinct JPEG per request (`--processor-cache-bytes 0`, so no
   processor-cache hits). Every configuration is started once and frozen (SIGSTOP) while
   anything else is measured; each run opens a fresh channel and warms up first.

Each run is time-boxed. Reported: images/s and p50/p95 latency (medians over rounds), the ratio
to the same round's HF baseline (median and best), and CPU milliseconds per image of each
process (service main process, workers, and the benchmark client), from `/proc` before and
after each run.

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
    #: Warm-up requests per request slot (service) / in total (baseline), before each run.
    warmup: int
    #: Alternating rounds: HF baseline, then each service configuration.
    rounds: int
    workers: tuple[int, ...] = (1, 2)
    #: `--worker-depth` values measured for each worker count (1: idle workers only; 2: pipelined,
    #: the default).
    depths: tuple[int, ...] = (1, 2)
    in_flight_per_worker: int = 2
    image_size: tuple[int, int] = (1024, 768)
    jpeg_quality: int = 90


QUICK = Settings(duration_s=1.5, min_requests=4, pool=12, warmup=1, rounds=1, depths=(2,))
FULL = Settings(duration_s=6.0, min_requests=16, pool=64, warmup=2, rounds=3)


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
    cpu_start = time.process_time()  # this process: the HF call's threads (the client is idle)
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
        "cpu_ms_per_image": (time.process_time() - cpu_start) / len(lat) * 1000.0,
        "latency": latency_summary(lat),
    }


# ---------------------------------------------------------------------------------------------
# Our service, as `vlm serve-preprocessor` runs it, over gRPC on loopback
# ---------------------------------------------------------------------------------------------


class ServiceUnderTest:
    """One `python -m preprocessor_svc.main` process tree (main + forkserver + workers), frozen
    (SIGSTOP) whenever it is not the configuration being measured."""

    def __init__(self, model_dir: Path, workers: int, depth: int, log_path: Path) -> None:
        from bench.model_systems import ProcGroup, child_env, free_port

        self.workers, self.depth = workers, depth
        self.port = free_port()
        cmd = [sys.executable, "-m", "preprocessor_svc.main", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", "-1",
               "--workers", str(workers), "--worker-depth", str(depth),
               "--processor-cache-bytes", "0", "--max-model-len", str(MAX_MODEL_LEN),
               "--log-level", "WARNING"]
        self.group = ProcGroup(f"preprocessor w{workers} d{depth}", cmd, child_env(), log_path)
        self.start_s: float | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        return f"w{self.workers}d{self.depth}"

    def start(self) -> ServiceUnderTest:
        self.group.start()
        return self

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        from bench.model_systems import grpc_serving, poll_until

        t = await poll_until(lambda: grpc_serving(self.target), [self.group], timeout_s,
                             f"preprocessor {self.label}", interval_s=0.5)
        self.start_s = t - (self.group.started_at or t)


async def service_run(
    svc: ServiceUnderTest, prompt: str, jpegs: list[bytes], s: Settings, start: int
) -> dict[str, Any]:
    """One timed run against a thawed service: a fresh channel, a warm-up, then 2 x workers
    requests in flight for `s.duration_s`; CPU seconds per process role are charged per image."""
    from bench.model_systems import CpuMeter
    from vlm.client import PreprocessorClient
    from vlm.types import Media, Modality, PromptInput

    in_flight = svc.workers * s.in_flight_per_worker
    counter = itertools.count(start)
    fields: dict[str, Any] = {}
    tokens: set[int] = set()

    async with PreprocessorClient(svc.target) as client:

        async def one() -> float:
            jpeg = jpegs[next(counter) % len(jpegs)]
            req = PromptInput(text=prompt, media=(Media(Modality.IMAGE, jpeg, "image/jpeg"),))
            t = time.perf_counter()
            out = await client.preprocess(req)
            dt = time.perf_counter() - t
            if not fields and out.items:
                for name, f in (out.items[0].fields or {}).items():
                    fields[name] = {"shape": list(f.data.shape), "dtype": str(f.data.dtype)}
            tokens.add(len(out.token_ids))
            return dt

        await asyncio.gather(*(one() for _ in range(in_flight * s.warmup)))
        meter = CpuMeter()
        cpu0 = meter.read([svc.group])
        lat: list[float] = []
        t_start = time.perf_counter()
        deadline = t_start + s.duration_s

        async def slot() -> None:
            while time.perf_counter() < deadline or len(lat) < s.min_requests:
                lat.append(await one())

        await asyncio.gather(*(slot() for _ in range(in_flight)))
        elapsed = time.perf_counter() - t_start
        cpu = CpuMeter.diff(cpu0, meter.read([svc.group]))
    return {
        "images": len(lat),
        "seconds": elapsed,
        "images_per_s": len(lat) / elapsed,
        "latency": latency_summary(lat),
        "prompt_tokens": sorted(tokens),
        "fields": fields,
        "cpu_ms_per_image": {role: v / len(lat) * 1000.0 for role, v in cpu.items()},
    }


def _freeze_all_but(services: list[ServiceUnderTest], active: ServiceUnderTest | None) -> None:
    for svc in services:
        if svc is active:
            svc.group.resume()
        else:
            svc.group.pause()


def _summary(runs: list[dict[str, Any]], refs: list[float]) -> dict[str, Any]:
    """Median images/s over rounds, and the ratio to the same round's HF baseline (best, median)."""
    ratios = [r["images_per_s"] / ref for r, ref in zip(runs, refs, strict=True)]
    roles = sorted({k for r in runs for k in r["cpu_ms_per_image"]})
    return {
        "images_per_s": statistics.median(r["images_per_s"] for r in runs),
        "latency_p50_ms": statistics.median(r["latency"]["p50_ms"] for r in runs),
        "latency_p95_ms": statistics.median(r["latency"]["p95_ms"] for r in runs),
        "ratio_rounds": ratios,
        "ratio_best": max(ratios),
        "ratio_median": statistics.median(ratios),
        "cpu_ms_per_image": {
            role: statistics.median(r["cpu_ms_per_image"].get(role, 0.0) for r in runs) for role in roles
        },
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


async def _family_run(fam: Family, root: Path, jpegs: list[bytes], s: Settings, out_dir: Path) -> dict[str, Any]:
    import torch

    model_dir = build_bench_fixture(fam.arch, root)
    proc, load_s = _load_hf_processor(model_dir)
    desc = hf_describe(proc, fam.prompt, jpegs[0])
    log(f"{fam.key}: HF {desc['image_processor']} ({desc['backend']}), {desc['prompt_tokens']} "
        f"prompt tokens, pixel_values {desc['pixel_values']['shape']}")
    services = [ServiceUnderTest(model_dir, w, d, out_dir / f"{NAME}.{fam.key}.w{w}d{d}.log")
                for w in s.workers for d in s.depths]
    # Started one after the other (each frozen once SERVING): a start is not what is measured,
    # and starting them together on 2 cores would only slow each down.
    try:
        for svc in services:
            _freeze_all_but(services, svc)
            await svc.start().wait_ready()
            log(f"{fam.key}: service {svc.label} SERVING after {svc.start_s:.1f}s")
        kw = dict(fam.vllm_hf_kwargs) if fam.vllm_hf_kwargs else None
        baselines: list[dict[str, Any]] = []
        matched: list[dict[str, Any]] = []
        results: dict[str, list[dict[str, Any]]] = {svc.label: [] for svc in services}
        for rnd in range(s.rounds):
            # Alternating rounds: HF, (HF as vLLM calls it), then each service configuration, so
            # each ratio compares runs a few seconds apart on this noisy machine.
            _freeze_all_but(services, None)
            first = rnd * len(jpegs) // max(1, s.rounds)
            baselines.append(hf_run(proc, fam.prompt, jpegs, s, start=first))
            if kw:
                matched.append(hf_run(proc, fam.prompt, jpegs, s, start=first, kwargs=kw))
            line = f"{fam.key} round {rnd + 1}/{s.rounds}: HF {baselines[-1]['images_per_s']:.1f}"
            for svc in services:
                _freeze_all_but(services, svc)
                r = await service_run(svc, fam.prompt, jpegs, s, start=first)
                results[svc.label].append(r)
                line += f", {svc.label} {r['images_per_s']:.1f}"
            log(line + " img/s")
    finally:
        for svc in services:
            await asyncio.to_thread(svc.group.stop)
    refs = [b["images_per_s"] for b in baselines]
    rows = []
    for svc in services:
        runs = results[svc.label]
        row = {"workers": svc.workers, "worker_depth": svc.depth,
               "in_flight": svc.workers * s.in_flight_per_worker, "start_s": svc.start_s,
               **_summary(runs, refs), "runs": runs}
        if matched:
            row["ratio_vs_hf_as_vllm_median"] = statistics.median(
                r["images_per_s"] / m["images_per_s"] for r, m in zip(runs, matched, strict=True))
        tokens = sorted({t for r in runs for t in r["prompt_tokens"]})
        row["prompt_tokens"] = tokens
        row["tokens_match_hf"] = tokens == [desc["prompt_tokens"]]
        row["fields"] = next((r["fields"] for r in runs if r["fields"]), {})
        pv = row["fields"].get("pixel_values", {}).get("dtype")
        row["vllm_kwargs_confirmed"] = (pv == "torch.uint8") == bool(fam.vllm_hf_kwargs) if pv else None
        rows.append(row)
    baseline = {"images_per_s": statistics.median(refs), "rounds": refs, "runs": baselines,
                "cpu_ms_per_image": statistics.median(b["cpu_ms_per_image"] for b in baselines)}
    as_vllm = None
    if matched:
        as_vllm = {"kwargs": kw, "images_per_s": statistics.median(m["images_per_s"] for m in matched),
                   "cpu_ms_per_image": statistics.median(m["cpu_ms_per_image"] for m in matched),
                   "ratio_vs_hf": statistics.median(
                       m["images_per_s"] / ref for m, ref in zip(matched, refs, strict=True)),
                   "runs": matched}
    return {
        "family": fam.key,
        "label": fam.label,
        "prompt": fam.prompt,
        "hf": {**desc, "load_s": load_s, "torch_threads": torch.get_num_threads()},
        "baseline": baseline,
        "baseline_as_vllm": as_vllm,
        "service": rows,
    }


def render_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        "## Preprocessing throughput: preprocessor service (own process, gRPC on loopback) vs. HF processor in-process",
        "",
        f"{s['image_size'][0]}×{s['image_size'][1]} synthetic JPEG photos (quality {s['jpeg_quality']}, "
        f"mean {data['images']['mean_kb']:.0f} KB), one image per request; {s['rounds']} alternating "
        f"round(s) of {s['duration_s']:g} s runs{' (QUICK: smoke settings)' if data['quick'] else ''}; "
        f"{data['machine']['cpu_count']} CPUs, load average {fmt(data['machine']['loadavg_1m'], 2)} at start. "
        "images/s and latencies: medians over rounds. *vs HF*: the service's images/s over the HF "
        "baseline's in the same round, median (best); *vs HF as vLLM calls it*: the same against "
        "the HF call with the kwargs vLLM adds (same CPU work as the service's processor).",
        "",
    ]
    rows = []
    for fam in data["families"]:
        b = fam["baseline"]
        m = fam.get("baseline_as_vllm")
        lat = [r["latency"] for r in b["runs"]]
        rounds = "/".join(f"{x:.0f}" for x in b["rounds"])
        rows.append([
            fam["label"], f"HF {fam['hf']['image_processor']} in-process ({rounds} img/s)", "–", "1",
            fmt(b["images_per_s"]), fmt(statistics.median(x["p50_ms"] for x in lat)),
            fmt(statistics.median(x["p95_ms"] for x in lat)), "1.00×",
            fmt_ratio(ratio(b["images_per_s"], m["images_per_s"])) if m else "–",
        ])
        if m:
            kw = ", ".join(f"{k}={v}" for k, v in m["kwargs"].items())
            mlat = [r["latency"] for r in m["runs"]]
            rows.append([
                fam["label"], f"HF in-process as vLLM calls it ({kw})", "–", "1",
                fmt(m["images_per_s"]), fmt(statistics.median(x["p50_ms"] for x in mlat)),
                fmt(statistics.median(x["p95_ms"] for x in mlat)), fmt_ratio(m["ratio_vs_hf"]), "1.00×",
            ])
        for r in fam["service"]:
            rows.append([
                fam["label"], f"preprocessor service, --worker-depth {r['worker_depth']}",
                r["workers"], r["in_flight"], fmt(r["images_per_s"]), fmt(r["latency_p50_ms"]),
                fmt(r["latency_p95_ms"]),
                f"{fmt_ratio(r['ratio_median'])} ({fmt_ratio(r['ratio_best'])})",
                fmt_ratio(r.get("ratio_vs_hf_as_vllm_median")),
            ])
    lines.append(md_table(
        ["processor", "path", "workers", "in flight", "images/s", "p50 ms", "p95 ms", "vs HF",
         "vs HF as vLLM calls it"], rows
    ))
    lines += ["", "CPU per image (ms, medians over rounds; user + system from /proc, every process "
              "of the service and the benchmark client; for HF, this process while it calls the "
              "processor with its default torch threads):", ""]
    rows = []
    for fam in data["families"]:
        threads = fam["hf"]["torch_threads"]
        for label, b in (("HF in-process", fam["baseline"]), ("HF as vLLM calls it", fam.get("baseline_as_vllm"))):
            if b and "cpu_ms_per_image" in b:
                rows.append([fam["label"], f"{label} ({threads} torch threads)", "–", "–", "–",
                             fmt(b["cpu_ms_per_image"]), "", "", ""])
        for r in fam["service"]:
            cpu = r["cpu_ms_per_image"]
            workers = sum(v for k, v in cpu.items() if k.startswith("preprocessing worker"))
            main = cpu.get("preprocessor_svc main", 0.0)
            client = cpu.get("benchmark client (driver)", 0.0)
            pv = r["fields"].get("pixel_values", {})
            rows.append([
                fam["label"], f"{r['workers']} (depth {r['worker_depth']})", fmt(workers), fmt(main),
                fmt(client), fmt(workers + main + client),
                f"{str(pv.get('dtype', '?')).removeprefix('torch.')} {pv.get('shape', '?')}",
                ",".join(map(str, r["prompt_tokens"])), "yes" if r["tokens_match_hf"] else "NO",
            ])
    lines.append(md_table(
        ["processor", "workers", "workers (all)", "service main", "client", "total",
         "pixel_values", "prompt tokens", "= HF tokens"], rows
    ))
    return "\n".join(lines) + "\n"


def run(*, quick: bool = False, out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    s = QUICK if quick else FULL
    t_all = time.perf_counter()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
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
                data["families"].append(await _family_run(fam, Path(tmp), jpegs, s, out_dir))

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
