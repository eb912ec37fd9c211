"""Model service pair vs. in-process AsyncLLM: startup, TTFT, decode speed and memory.

A tiny LLaVA (`vlm.testing.tiny_models`, CLIP 32 px + 2-layer Llama) on CPU, the same engine
settings on both sides (`enforce_eager=True`, `dtype=float32`, `max_model_len=2048`, seed 0,
`VLLM_CPU_KVCACHE_SPACE=1`; vLLM's default multiprocess engine, or with `--quick` the in-process
one, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, which starts faster), measured in one run:

* **baseline**: `vllm.v1.engine.async_llm.AsyncLLM` in-process, fed the raw image
  (`{"prompt": "USER: <image>\\n...", "multi_modal_data": {"image": pil}}`, output kind DELTA);
  the JPEG decode is inside the timed request, as the pair's preprocessor decodes too;
* **pair**: `ModelApp` + `PreprocessorApp` (1 worker) on loopback, the client calling
  `PreprocessorClient.generate` (preprocessor → model service → engine, tokens streamed back
  through both gRPC hops). Everything but the engine core and the preprocessor worker runs on
  one event loop in one process, as in `tests/e2e/conftest.py`.

Each side runs in its own child process (`python -m bench.model_latency --side baseline|pair`),
one after the other, so that memory is attributable: the driver samples the RSS (and PSS) of
the child's whole process tree (parent + vLLM engine core + preprocessor forkserver/worker).

Per side: import time, startup to ready (AsyncLLM constructed / both services SERVING), first
request after startup, then for N concurrent requests (N = 1 and 4; greedy, ignore_eos, 64
tokens, one distinct 1024×768 JPEG per request): TTFT p50/p95, time per output token, decode
tokens/s (aggregate over the N streams), output tokens/s (tokens / wall time), and peak memory.

    python -m bench.model_latency [--quick] [--out DIR]          # driver: both sides + report
    python -m bench.model_latency --side baseline|pair --model-dir D --images D --json F
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_OUT,
    TreeMemorySampler,
    fmt,
    fmt_ratio,
    latency_summary,
    log,
    machine_info,
    md_table,
    ratio,
    synthetic_jpegs,
    tree_memory,
    write_results,
)

NAME = "model_latency"
REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "USER: <image>\nWhat is in this picture? Describe it. ASSISTANT:"
MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    #: Rounds of N simultaneous requests per concurrency level.
    rounds: int
    max_tokens: int
    #: Sequential warm-up requests (then one round at the highest concurrency).
    warmup: int
    #: Per-side limit (the child is killed after it).
    side_timeout_s: float
    #: vLLM's engine-core process layout (VLLM_ENABLE_V1_MULTIPROCESSING, unless set in the
    #: environment): the default multiprocess engine (engine core + worker processes, as
    #: deployed) or, for smoke tests, the in-process one, which starts about 20 s faster.
    engine_multiprocessing: bool = True
    image_size: tuple[int, int] = (1024, 768)

    def images_needed(self) -> int:
        return 1 + self.warmup + max(self.concurrency) + self.rounds * sum(self.concurrency)


QUICK = Settings(
    concurrency=(1, 4), rounds=2, max_tokens=64, warmup=1, side_timeout_s=300, engine_multiprocessing=False
)
FULL = Settings(concurrency=(1, 4), rounds=10, max_tokens=64, warmup=2, side_timeout_s=480)


def engine_kwargs(model_dir: str) -> dict[str, Any]:
    """Identical on both sides (the KV cache size comes from VLLM_CPU_KVCACHE_SPACE)."""
    return dict(model=model_dir, max_model_len=MAX_MODEL_LEN, enforce_eager=True, dtype="float32", seed=0)


# ---------------------------------------------------------------------------------------------
# Child side: measurement
# ---------------------------------------------------------------------------------------------

#: A request function: image index → timings of one streamed generation.
RequestFn = Callable[[int], Awaitable[dict[str, Any]]]


def _timing(start: float, first: float | None, end: float, n: int, prompt_tokens: int | None) -> dict[str, Any]:
    return {"start": start, "first": first, "end": end, "tokens": n, "prompt_tokens": prompt_tokens}


def _summarize(rounds: list[tuple[float, list[dict[str, Any]]]]) -> dict[str, Any]:
    reqs = [r for _, rs in rounds for r in rs]
    ttft = [r["first"] - r["start"] for r in reqs if r["first"] is not None]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in reqs if r["first"] and r["tokens"] > 1]
    e2e = [r["end"] - r["start"] for r in reqs]
    decode, output = [], []
    for wall, rs in rounds:
        firsts = [r["first"] for r in rs if r["first"] is not None]
        span = max(r["end"] for r in rs) - min(firsts) if firsts else 0.0
        if span > 0:
            decode.append(sum(max(r["tokens"] - 1, 0) for r in rs) / span)
        output.append(sum(r["tokens"] for r in rs) / wall)
    return {
        "requests": len(reqs),
        "rounds": len(rounds),
        "ttft": latency_summary(ttft),
        "tpot": latency_summary(tpot),
        "e2e": latency_summary(e2e),
        # Aggregate over the N streams: tokens after each stream's first / (last end - first first).
        "decode_tok_s": statistics.median(decode) if decode else None,
        "output_tok_s": statistics.median(output) if output else None,
        # Per round, to judge the noise (the table shows min-max next to the median).
        "decode_tok_s_rounds": decode,
        "output_tok_s_rounds": output,
        "tokens_per_request": sorted({r["tokens"] for r in reqs}),
        "prompt_tokens": sorted({r["prompt_tokens"] for r in reqs if r["prompt_tokens"] is not None}),
    }


async def _measure(request: RequestFn, s: Settings) -> dict[str, Any]:
    idx = itertools.count()
    t = time.perf_counter()
    await request(next(idx))
    first_request_s = time.perf_counter() - t
    for _ in range(s.warmup):
        await request(next(idx))
    await asyncio.gather(*(request(next(idx)) for _ in range(max(s.concurrency))))
    levels = {}
    for c in s.concurrency:
        rounds = []
        for _ in range(s.rounds):
            t0 = time.perf_counter()
            reqs = await asyncio.gather(*(request(next(idx)) for _ in range(c)))
            rounds.append((time.perf_counter() - t0, list(reqs)))
        levels[str(c)] = _summarize(rounds)
        log(f"  N={c}: TTFT p50 {levels[str(c)]['ttft']['p50_ms']:.0f} ms, "
            f"decode {levels[str(c)]['decode_tok_s'] or 0:.0f} tok/s")
    return {"first_request_s": first_request_s, "concurrency": levels}


def _load_images(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]


async def side_baseline(model_dir: str, jpegs: list[bytes], s: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    import io

    from PIL import Image
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from vlm.testing.tiny_models import warm_vllm_model_info_cache

    import_s = time.perf_counter() - t0
    warm_vllm_model_info_cache(model_dir)  # once per architecture; kept out of the timings

    t0 = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model_dir)))
    ready_s = time.perf_counter() - t0
    mem_ready = tree_memory()
    log(f"baseline: AsyncLLM ready in {ready_s:.1f}s")

    async def request(i: int) -> dict[str, Any]:
        start = time.perf_counter()
        with Image.open(io.BytesIO(jpegs[i % len(jpegs)])) as im:
            image = im.convert("RGB")
        params = SamplingParams(
            max_tokens=s.max_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        first, n, ptoks = None, 0, None
        prompt = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
        async for out in llm.generate(prompt, params, f"bench-{uuid.uuid4().hex}"):
            k = len(out.outputs[0].token_ids) if out.outputs else 0
            if k and first is None:
                first = time.perf_counter()
            n += k
            if ptoks is None and out.prompt_token_ids is not None:
                ptoks = len(out.prompt_token_ids)
        return _timing(start, first, time.perf_counter(), n, ptoks)

    try:
        result = await _measure(request, s)
        mem_end = tree_memory()
    finally:
        llm.shutdown()
        # Collect vLLM's client now: its __del__ at interpreter exit would shut down again
        # when the modules it needs are gone (as model_svc.engine does).
        del llm
    return {
        "import_s": import_s,
        "ready_s": ready_s,
        "startup": {"engine_s": ready_s},
        "memory_at_ready": mem_ready,
        "memory_at_end": mem_end,
        **result,
    }


async def side_pair(model_dir: str, jpegs: list[bytes], s: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    from vllm.engine.arg_utils import AsyncEngineArgs

    from model_svc.app import ModelApp
    from model_svc.engine import EngineConfig
    from preprocessor_svc.app import PreprocessorApp
    from preprocessor_svc.processing import PreprocessorConfig
    from vlm.client import PreprocessorClient, check_health
    from vlm.server import ServerOptions
    from vlm.testing.tiny_models import warm_vllm_model_info_cache
    from vlm.types import Media, Modality, PromptInput, Sampling

    import_s = time.perf_counter() - t0
    warm_vllm_model_info_cache(model_dir)

    options = ServerOptions(metrics_port=None, grace_s=0.5)
    # `vlm serve-model`'s default: no engine-side processor cache (features arrive processed).
    args = AsyncEngineArgs(**engine_kwargs(model_dir), mm_processor_cache_gb=0)
    t0 = time.perf_counter()
    model = await ModelApp.start(EngineConfig(engine_args=args), options)
    model_s = time.perf_counter() - t0
    log(f"pair: model service SERVING in {model_s:.1f}s")
    pre = None
    try:
        t0 = time.perf_counter()
        pre = await PreprocessorApp.start(
            PreprocessorConfig(model=model_dir, workers=1, max_model_len=MAX_MODEL_LEN, dtype="float32"),
            options,
            model_target=f"127.0.0.1:{model.grpc.port}",
        )
        pre_s = time.perf_counter() - t0
        log(f"pair: preprocessor SERVING in {pre_s:.1f}s")
        health = {
            "model": await check_health(f"127.0.0.1:{model.grpc.port}"),
            "preprocessor": await check_health(f"127.0.0.1:{pre.grpc.port}"),
        }
        mem_ready = tree_memory()
        sampling = Sampling(temperature=0.0, max_tokens=s.max_tokens, ignore_eos=True)
        async with PreprocessorClient(f"127.0.0.1:{pre.grpc.port}") as client:

            async def request(i: int) -> dict[str, Any]:
                media = Media(Modality.IMAGE, jpegs[i % len(jpegs)], "image/jpeg")
                start = time.perf_counter()
                first, n, ptoks = None, 0, None
                async for chunk in client.generate(PromptInput(text=PROMPT, media=(media,)), sampling):
                    if chunk.token_ids and first is None:
                        first = time.perf_counter()
                    n += len(chunk.token_ids)
                    if chunk.usage is not None:
                        ptoks = chunk.usage.prompt_tokens
                return _timing(start, first, time.perf_counter(), n, ptoks)

            result = await _measure(request, s)
        mem_end = tree_memory()
    finally:
        if pre is not None:
            await pre.close()
        await model.close()
    return {
        "import_s": import_s,
        "ready_s": model_s + pre_s,
        "startup": {
            "model_serving_s": model_s,
            "preprocessor_serving_s": pre_s,
            "model_engine_breakdown_s": dict(model.engine.startup_seconds),
            "preprocessor_worker_build_s": list(pre.preprocessor.build_seconds),
        },
        "health": health,
        "memory_at_ready": mem_ready,
        "memory_at_end": mem_end,
        **result,
    }


def settings(quick: bool, rounds: int | None = None) -> Settings:
    s = QUICK if quick else FULL
    return s if rounds is None else dataclasses.replace(s, rounds=rounds)


def child_main(args: argparse.Namespace) -> int:
    s = settings(args.quick, args.rounds)
    jpegs = _load_images(args.images)
    fn = side_baseline if args.side == "baseline" else side_pair
    t0 = time.perf_counter()
    out = asyncio.run(fn(str(args.model_dir), jpegs, s))
    out["side"] = args.side
    out["side_total_s"] = time.perf_counter() - t0
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _run_side(
    side: str, model_dir: Path, images: Path, tmp: Path, out_dir: Path, quick: bool, rounds: int | None
) -> dict[str, Any]:
    s = settings(quick, rounds)
    json_path = tmp / f"{side}.json"
    log_path = out_dir / f"{NAME}.{side}.log"
    cmd = [
        sys.executable, "-m", "bench.model_latency", "--side", side, "--model-dir", str(model_dir),
        "--images", str(images), "--json", str(json_path), *(["--quick"] if quick else []),
        *(["--rounds", str(rounds)] if rounds is not None else []),
    ]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if s.engine_multiprocessing else "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log(f"model: starting side {side!r} (log: {log_path})")
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = TreeMemorySampler(proc.pid, interval_s=0.25, pss_every=8).start()
        timed_out = False
        try:
            rc = proc.wait(timeout=s.side_timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # our child's own session only
            rc = proc.wait()
        finally:
            peak = sampler.stop()
    wall = time.perf_counter() - t0
    if not json_path.exists():
        raise RuntimeError(
            f"side {side!r} failed (exit {rc}{', timed out' if timed_out else ''}); last lines of "
            f"{log_path}:\n{_tail(log_path)}"
        )
    data = json.loads(json_path.read_text())
    data.update(process_tree_peak=peak, wall_s=wall, exit_code=rc, timed_out=timed_out)
    return data


def _c(side: dict[str, Any], c: int, key: str, sub: str | None = None) -> float | None:
    level = side["concurrency"].get(str(c))
    if level is None:
        return None
    v = level[key]
    return v[sub] if sub else v


def render_markdown(data: dict[str, Any]) -> str:
    b, p, s = data["baseline"], data["pair"], data["settings"]
    rows: list[list[str]] = []

    def row(label: str, bv: float | None, pv: float | None, digits: int = 1, better: str = "",
            spread: tuple[list[float], list[float]] | None = None) -> None:
        cells = [fmt(bv, digits), fmt(pv, digits)]
        if spread is not None:  # append "(min–max over rounds)" when there are several rounds
            cells = [c + (f" ({min(xs):.0f}–{max(xs):.0f})" if len(xs) > 1 else "")
                     for c, xs in zip(cells, spread)]
        rows.append([label, *cells, fmt_ratio(ratio(pv, bv)), better])

    row("import (s)", b["import_s"], p["import_s"], better="lower")
    row("startup to ready (s): engine ready / both SERVING", b["ready_s"], p["ready_s"], better="lower")
    row("first request after startup (s)", b["first_request_s"], p["first_request_s"], 2, "lower")
    for c in s["concurrency"]:
        row(f"TTFT p50 @ N={c} (ms)", _c(b, c, "ttft", "p50_ms"), _c(p, c, "ttft", "p50_ms"), better="lower")
        row(f"TTFT p95 @ N={c} (ms)", _c(b, c, "ttft", "p95_ms"), _c(p, c, "ttft", "p95_ms"), better="lower")
        row(f"time per output token p50 @ N={c} (ms)", _c(b, c, "tpot", "p50_ms"), _c(p, c, "tpot", "p50_ms"), 2, "lower")
        row(f"decode tok/s @ N={c} (all streams)", _c(b, c, "decode_tok_s"), _c(p, c, "decode_tok_s"),
            better="higher", spread=(_c(b, c, "decode_tok_s_rounds"), _c(p, c, "decode_tok_s_rounds")))
        row(f"output tok/s @ N={c} (tokens / wall)", _c(b, c, "output_tok_s"), _c(p, c, "output_tok_s"),
            better="higher", spread=(_c(b, c, "output_tok_s_rounds"), _c(p, c, "output_tok_s_rounds")))
    row("peak RSS, process tree (MiB)", b["process_tree_peak"]["peak_rss_mb"], p["process_tree_peak"]["peak_rss_mb"], 0, "lower")
    row("peak PSS, process tree (MiB)", b["process_tree_peak"]["peak_pss_mb"], p["process_tree_peak"]["peak_pss_mb"], 0, "lower")
    mp = data["machine"]["env"].get("VLLM_ENABLE_V1_MULTIPROCESSING")
    layout = "multiprocess engine" if mp != "0" else "in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)"
    lines = [
        "## Model path: gRPC pair (preprocessor → model service) vs. in-process AsyncLLM",
        "",
        f"Tiny LLaVA on CPU, {layout}, float32, enforce_eager, VLLM_CPU_KVCACHE_SPACE=1; greedy, ignore_eos, "
        f"{s['max_tokens']} tokens per request, one distinct {s['image_size'][0]}×{s['image_size'][1]} "
        f"JPEG per request, {s['rounds']} round(s) per N{' (QUICK: smoke settings)' if data['quick'] else ''}; "
        f"{data['machine']['cpu_count']} CPUs, load average {fmt(data['machine']['loadavg_1m'], 2)} at start.",
        "",
        md_table(["metric", "in-process AsyncLLM", "gRPC pair", "pair / baseline", "better"], rows),
        "",
        "Token rates: median over rounds, (min–max) when there are several. Ratios of medians.",
        "",
        f"Pair startup: model service {fmt(p['startup']['model_serving_s'])} s "
        f"({', '.join(f'{k} {v:.1f}' for k, v in p['startup']['model_engine_breakdown_s'].items())}), "
        f"then preprocessor {fmt(p['startup']['preprocessor_serving_s'])} s (sequential here; in a deployment "
        "they start in parallel). Prompt tokens: baseline "
        f"{_c(b, s['concurrency'][0], 'prompt_tokens')}, pair {_c(p, s['concurrency'][0], 'prompt_tokens')}.",
        "",
        "Memory at the end of the load phase, by process (MiB):",
        "",
    ]
    mem_rows = []
    for name, side in (("baseline", b), ("pair", p)):
        for proc in side["memory_at_end"].get("by_process", []):
            mem_rows.append([name, proc["role"], fmt(proc["rss_mb"], 0), fmt(proc["pss_mb"], 0)])
    lines.append(md_table(["side", "process", "RSS", "PSS"], mem_rows))
    return "\n".join(lines) + "\n"


def run(*, quick: bool = False, out_dir: Path = DEFAULT_OUT, rounds: int | None = None) -> dict[str, Any]:
    from vlm.testing.tiny_models import build_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    s = settings(quick, rounds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    data: dict[str, Any] = {
        "benchmark": NAME,
        "quick": quick,
        "settings": asdict(s),
        "prompt": PROMPT,
        "engine_kwargs": {k: v for k, v in engine_kwargs("<model>").items() if k != "model"},
        "machine": machine_info(),
    }
    data["machine"]["env"]["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    data["machine"]["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "1" if s.engine_multiprocessing else "0"
    )
    with tempfile.TemporaryDirectory(prefix="vlm-bench-model-") as tmp_s:
        tmp = Path(tmp_s)
        model_dir = build_tiny_model("llava", tmp / "tiny-llava")
        images = tmp / "images"
        images.mkdir()
        n = s.images_needed()
        log(f"model: generating {n} synthetic {s.image_size[0]}x{s.image_size[1]} JPEGs")
        for i, jpeg in enumerate(synthetic_jpegs(n, s.image_size, seed0=10_000)):
            (images / f"{i:04d}.jpg").write_bytes(jpeg)
        for side in ("baseline", "pair"):
            data[side] = _run_side(side, model_dir, images, tmp, out_dir, quick, rounds)
            log(f"model: side {side!r} done in {data[side]['wall_s']:.0f}s, peak RSS "
                f"{data[side]['process_tree_peak']['peak_rss_mb']:.0f} MiB")
    data["total_s"] = time.perf_counter() - t_all
    md = render_markdown(data)
    paths = write_results(out_dir, NAME, data, md)
    print(md, flush=True)
    log(f"model: done in {data['total_s']:.0f}s; wrote {paths[0]} and {paths[1]}")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model_latency", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke-test settings (< 2 min)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of N concurrent requests per level (default: 2 quick, 10 full)")
    p.add_argument("--side", choices=("baseline", "pair"), default=None,
                   help="internal: run one side in this process and write --json")
    p.add_argument("--model-dir", type=Path, help="(--side) model directory")
    p.add_argument("--images", type=Path, help="(--side) folder of JPEGs")
    p.add_argument("--json", type=Path, help="(--side) where to write the side's results")
    args = p.parse_args(argv)
    if args.side:
        if not (args.model_dir and args.images and args.json):
            p.error("--side needs --model-dir, --images and --json")
        return child_main(args)
    run(quick=args.quick, out_dir=args.out, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
