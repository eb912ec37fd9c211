"""Serving path, as users run it: the gRPC pair vs. vLLM's OpenAI server vs. in-process AsyncLLM.

One run starts every system as real OS processes on 127.0.0.1, one system after the other (so
that each startup is timed alone), then measures them in alternating rounds (round 1: every
system at N=1, then every system at N=4; round 2: the same; ...), because the machine is noisy:

* **inproc**: `AsyncLLM` in a child process (`bench.model_inproc`), fed the raw image
  (`{"prompt": "USER: <image>...", "multi_modal_data": {"image": pil}}`), DELTA outputs; the
  client is in that process. The limit.
* **vllm_serve**: `python -m vllm.entrypoints.openai.api_server`, driven with the `openai` SDK
  (`stream=True`, chat messages, the image as a `data:image/jpeg;base64,...` URL). What users
  run instead.
* **pair**: `python -m model_svc.main` and `python -m preprocessor_svc.main --workers 1
  --cpus LAST` (LAST: the last CPU, the one vLLM's CPU backend leaves to processes other than its
  worker), started at the same time (as compose does), driven with `PreprocessorClient.generate`.
* **model_direct**: the pair's model service alone: every benchmark image is preprocessed once
  by the pair's preprocessor beforehand, and the resulting `Prompt`s go straight to
  `ModelClient.generate(..., hash_only=False)`.
* **vllm_grpc** (when `smg-grpc-servicer` and `smg-grpc-proto` are importable):
  `python -m vllm.entrypoints.launchers.grpc_server`, fed the same preprocessed prompts as
  token IDs + `MultimodalInputs` (`bench.vllm_grpc_client`).

The clients of vllm_serve, pair, model_direct and vllm_grpc run in this (the driver) process.
While one system starts, warms up or runs a round, every other system's processes are frozen
(SIGSTOP; `--no-freeze` leaves them running), as users run one system per machine.
Engine settings are the same everywhere: tiny LLaVA, `enforce_eager`, float32,
`max_model_len=2048`, seed 0, `VLLM_CPU_KVCACHE_SPACE=1`, vLLM's default multiprocess engine.
Requests: greedy, `ignore_eos`, 32 tokens, one distinct 1024×768 JPEG each (the same images, in
the same order, for inproc / vllm_serve / pair; another set, shared by model_direct and
vllm_grpc, because model_direct runs on the pair's engine and a repeated image would hit its
prefix cache).

    python -m bench.model_latency [--quick] [--rounds N] [--out DIR] [--systems a,b] [--py-spy S]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_OUT,
    fmt,
    latency_summary,
    log,
    machine_info,
    md_table,
    percentile,
    synthetic_jpegs,
    tree_memory,
    write_results,
)

NAME = "model_latency"
REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_MODEL_LEN = 2048
ALL_SYSTEMS = ("inproc", "vllm_serve", "pair", "model_direct", "vllm_grpc")


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    #: Alternating rounds: in each, every system runs one round per concurrency level.
    rounds: int
    max_tokens: int
    #: Sequential warm-up requests per system (then one round at the highest concurrency).
    warmup: int
    #: Limit per system to reach ready.
    start_timeout_s: float
    #: vLLM's engine layout (VLLM_ENABLE_V1_MULTIPROCESSING unless set in the environment): the
    #: default (AsyncLLM's engine-core process + on CPU a separate worker process with OMP
    #: pinning) or, for the smoke test, the worker inside the engine-core process (one vLLM
    #: import less per system, ≈ 10 s).
    engine_multiprocessing: bool = True
    #: Pause between two systems' rounds (None: 1.5 s with the multiprocess engine, else 0.3 s).
    #: vLLM's multiprocess engine busy-waits (sched_yield on its shared-memory queues) for 1 s
    #: after its last message, and on CPU every engine pins its worker to the same core: without
    #: the pause, a round would share the CPU with the previous system's spinning engine.
    gap_s: float | None = None
    #: SIGSTOP every other system's processes while one system starts, warms up or runs a round
    #: (SIGCONT before its turn). Users run one system per machine: without this, the idle
    #: systems' vLLM workers (all pinned to the same core) and their polling threads take CPU
    #: time from the system being measured, and the more processes a system has, the more it loses.
    freeze_idle: bool = True
    image_size: tuple[int, int] = (1024, 768)

    def images_per_set(self) -> int:
        return self.warmup + max(self.concurrency) + self.rounds * sum(self.concurrency)


QUICK = Settings(concurrency=(1, 4), rounds=3, max_tokens=32, warmup=1, start_timeout_s=240,
                 engine_multiprocessing=False)
FULL = Settings(concurrency=(1, 4), rounds=10, max_tokens=32, warmup=2, start_timeout_s=300)


def settings(quick: bool, rounds: int | None = None) -> Settings:
    s = QUICK if quick else FULL
    return s if rounds is None else dataclasses.replace(s, rounds=rounds)


def engine_kwargs() -> dict[str, Any]:
    """The same for every system (the KV cache size comes from VLLM_CPU_KVCACHE_SPACE)."""
    return {"max_model_len": MAX_MODEL_LEN, "enforce_eager": True, "dtype": "float32", "seed": 0}


# ---------------------------------------------------------------------------------------------
# Plan and statistics
# ---------------------------------------------------------------------------------------------


def image_plan(s: Settings, offset: int) -> dict[str, Any]:
    """Image indices for one set: warm-up, then per (round, concurrency) a fresh slice."""
    it = iter(range(offset, offset + s.images_per_set()))
    plan = {
        "warmup_seq": [next(it) for _ in range(s.warmup)],
        "warmup_round": [next(it) for _ in range(max(s.concurrency))],
        "rounds": {},
    }
    for r in range(s.rounds):
        for c in s.concurrency:
            plan["rounds"][(r, c)] = [next(it) for _ in range(c)]
    return plan


def round_record(r: int, c: int, wall: float, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [q["first"] - q["start"] for q in reqs if q["first"] is not None]
    tokens = sum(q["tokens"] for q in reqs)
    return {
        "round": r, "concurrency": c, "wall_s": wall,
        "output_tok_s": tokens / wall if wall > 0 else None,
        "ttft_p50_ms": percentile(ttft, 50) * 1000 if ttft else None,
        "requests": [{
            "ttft_ms": (q["first"] - q["start"]) * 1000 if q["first"] is not None else None,
            "e2e_ms": (q["end"] - q["start"]) * 1000,
            "tpot_ms": ((q["end"] - q["first"]) / (q["tokens"] - 1) * 1000
                        if q["first"] is not None and q["tokens"] > 1 else None),
            "tokens": q["tokens"], "prompt_tokens": q["prompt_tokens"],
        } for q in reqs],
    }


def _spread(xs: list[float]) -> dict[str, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"best": None, "min": None, "max": None, "median": None}
    return {"min": min(xs), "max": max(xs), "median": statistics.median(xs)}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    reqs = [q for r in rounds for q in r["requests"]]
    tok = _spread([r["output_tok_s"] for r in rounds])
    tok["best"] = tok["max"]
    ttft_rounds = _spread([r["ttft_p50_ms"] for r in rounds])
    ttft_rounds["best"] = ttft_rounds["min"]
    return {
        "rounds": len(rounds),
        "requests": len(reqs),
        "output_tok_s": tok,  # per round: Σ tokens / round wall time
        "output_tok_s_rounds": [r["output_tok_s"] for r in rounds],
        "ttft": latency_summary([q["ttft_ms"] / 1000 for q in reqs if q["ttft_ms"] is not None]),
        "ttft_p50_ms_rounds": ttft_rounds,  # per-round medians: best = lowest
        "tpot": latency_summary([q["tpot_ms"] / 1000 for q in reqs if q["tpot_ms"] is not None]),
        "e2e": latency_summary([q["e2e_ms"] / 1000 for q in reqs]),
        "tokens_per_request": sorted({q["tokens"] for q in reqs}),
        "prompt_tokens": sorted({q["prompt_tokens"] for q in reqs if q["prompt_tokens"] is not None}),
    }


def paired_ratio(data: dict[str, Any], a: str, b: str, c: int, key: str) -> dict[str, Any] | None:
    """a / b for one figure: of the pooled figures, and per round (a and b measured back to back)."""
    sa, sb = data["systems"].get(a), data["systems"].get(b)
    if not sa or not sb or "levels" not in sa or "levels" not in sb:
        return None
    la, lb = sa["levels"].get(str(c)), sb["levels"].get(str(c))
    if not la or not lb:
        return None
    if key == "output_tok_s":
        va, vb = la["output_tok_s"]["best"], lb["output_tok_s"]["best"]
        ra, rb = la["output_tok_s_rounds"], lb["output_tok_s_rounds"]
        basis = "best round / best round"
    else:  # ttft_p50
        va, vb = la["ttft"]["p50_ms"], lb["ttft"]["p50_ms"]
        ra = [r["ttft_p50_ms"] for r in sa["rounds"] if r["concurrency"] == c]
        rb = [r["ttft_p50_ms"] for r in sb["rounds"] if r["concurrency"] == c]
        basis = "p50 over all requests"
    per_round = [x / y for x, y in zip(ra, rb) if x is not None and y]
    return {
        "a": a, "b": b, "concurrency": c, "figure": key, "basis": basis,
        "ratio": va / vb if va is not None and vb else None,
        "per_round": per_round,
        "per_round_median": statistics.median(per_round) if per_round else None,
        "per_round_min": min(per_round) if per_round else None,
        "per_round_max": max(per_round) if per_round else None,
    }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _memory(system: Any) -> dict[str, Any]:
    out = {}
    for g in system.groups:
        if g.alive():
            m = tree_memory(g.pid)
            out[g.name] = {"rss_mb": m.get("rss_mb"), "pss_mb": m.get("pss_mb"), "processes": m.get("processes"),
                           "by_process": [{k: p[k] for k in ("role", "rss_mb", "pss_mb")} for p in m.get("by_process", [])]}
    return out


async def _warm(system: Any, plan: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Warm-up; returns the first request's latency and its output (for the output check)."""
    first = None
    for i in plan["warmup_seq"]:
        q = await system.request(i)
        if first is None:
            first = (q["end"] - q["start"], {"image": i, **q.get("output", {})})
    await system.run_round(plan["warmup_round"])
    return first


def output_check(data: dict[str, Any]) -> dict[str, Any]:
    """Greedy outputs of the first warm-up request, compared within each image set."""
    out = {}
    for group in (("inproc", "vllm_serve", "pair"), ("model_direct", "vllm_grpc")):
        outs = {n: data["systems"][n].get("first_output") for n in group
                if n in data["systems"] and data["systems"][n].get("first_output")}
        if len(outs) < 2:
            continue
        for key in ("token_ids", "text"):
            vals = {n: o[key] for n, o in outs.items() if o.get(key) is not None}
            if len(vals) >= 2:
                ref = next(iter(vals.values()))
                out[f"{'/'.join(vals)} {key}"] = all(v == ref for v in vals.values())
    return out


async def _profile(pair: Any, ctx: dict[str, Any], seconds: float, out_dir: Path) -> dict[str, Any]:
    """py-spy on both pair services (subprocesses included) while the pair runs at N=4."""
    import shutil

    from bench.model_systems import ProcGroup

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return {"skipped": "py-spy not found (uv pip install py-spy)"}
    spies = []
    for g in pair.groups:
        raw = out_dir / f"{NAME}.pyspy.{g.name}.txt"
        cmd = [exe, "record", "--pid", str(g.pid), "--subprocesses", "--rate", "100", "--duration",
               str(int(seconds)), "--format", "raw", "--nonblocking", "--output", str(raw)]
        spies.append((g.name, raw, ProcGroup(f"py-spy-{g.name}", cmd, dict(os.environ),
                                             out_dir / f"{NAME}.pyspy.{g.name}.log").start()))
    await asyncio.sleep(1.0)
    pool, n = ctx["profile_images"], 0  # fresh images, cycled if the phase needs more
    while any(sp.alive() for _, _, sp in spies):
        await pair.run_round([pool[(n + k) % len(pool)] for k in range(4)])
        n += 4
    res: dict[str, Any] = {"seconds": seconds, "requests": n}
    for name, raw, sp in spies:
        sp.stop(2)
        res[name] = top_frames(raw) if raw.exists() else {"error": f"no output; see {sp.log_path}"}
    return res


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: `frame;frame;... COUNT` per record. With --subprocesses
    the first frames name processes (`process PID:"cmdline"`), and a command line may hold
    newlines, so a record ends at the first line that ends in ` COUNT`."""
    import re

    records, buf = [], ""
    for line in text.split("\n"):
        buf = f"{buf}\n{line}" if buf else line
        m = re.search(r" (\d+)$", buf)
        if m:
            records.append((buf[: m.start()].split(";"), int(m.group(1))))
            buf = ""
    return records


def _proc_label(frame: str) -> str:
    if "EngineCore" in frame:
        return "vLLM engine core"
    if "VLLM::Worker" in frame or "VllmWorker" in frame or "spawn_main" in frame:
        return "vLLM worker"
    if "forkserver" in frame:
        return "preprocessing worker (forked by the forkserver)"
    if "model_svc.main" in frame:
        return "model_svc main (gRPC + AsyncLLM frontend)"
    if "preprocessor_svc.main" in frame:
        return "preprocessor_svc main (gRPC + relay)"
    return frame[:60]


_OWN = ("vlm/", "model_svc/", "preprocessor_svc/")


def top_frames(raw_path: Path, n: int = 8) -> dict[str, Any]:
    """Per sampled process (the deepest `process` frame): its samples, the busiest leaf frames
    (own time) and the deepest frames of this project's code (time spent in or under them).
    py-spy drops threads that sleep; a thread that is runnable but waiting for a CPU still counts,
    so on a saturated machine samples overstate CPU time (the CPU table has the real figures)."""
    per: dict[str, dict[str, Any]] = {}
    total = 0
    for frames, k in parse_collapsed(raw_path.read_text(errors="replace")):
        procs = [f for f in frames if f.startswith("process ")]
        code = [f for f in frames if not f.startswith("process ")]
        label = _proc_label(procs[-1]) if procs else "?"
        d = per.setdefault(label, {"samples": 0, "leaf": {}, "own": {}})
        d["samples"] += k
        total += k
        if code:
            d["leaf"][code[-1]] = d["leaf"].get(code[-1], 0) + k
            # The services' `main` only runs the event loop: callbacks sit under it.
            own = [f for f in code if any(f"({o}" in f for o in _OWN) and not f.startswith("<module>")
                   and "/main.py:" not in f]
            key = own[-1] if own else "(no project frame: event loop, gRPC, vLLM)"
            d["own"][key] = d["own"].get(key, 0) + k
    out = {"samples": total, "raw": str(raw_path), "processes": {}}
    for label, d in sorted(per.items(), key=lambda kv: -kv[1]["samples"]):
        out["processes"][label] = {
            "samples": d["samples"],
            "top_leaf": [{"frame": f, "samples": c} for f, c in sorted(d["leaf"].items(), key=lambda kv: -kv[1])[:n]],
            "top_project": [{"frame": f, "samples": c} for f, c in sorted(d["own"].items(), key=lambda kv: -kv[1])[:n]],
        }
    return out


async def _run_systems(s: Settings, ctx: dict[str, Any], wanted: list[str], data: dict[str, Any],
                       py_spy_s: float) -> None:
    from bench import vllm_grpc_client
    from bench.model_systems import (
        CpuMeter,
        InprocSystem,
        ModelDirectSystem,
        PairSystem,
        VllmGrpcSystem,
        VllmServeSystem,
        pair_preprocess,
    )

    plan_a = image_plan(s, 0)
    plan_b = image_plan(s, s.images_per_set())
    prompts: dict[int, Any] = {}
    systems: dict[str, Any] = {}
    results = data["systems"]
    if "vllm_grpc" in wanted:
        why = vllm_grpc_client.available()
        if why:
            results["vllm_grpc"] = {"skipped": why}
            wanted = [w for w in wanted if w != "vllm_grpc"]
    if "model_direct" in wanted and "pair" not in wanted:
        wanted = [w for w in wanted if w != "model_direct"]
        results["model_direct"] = {"skipped": "needs the pair"}
    order = [w for w in ALL_SYSTEMS if w in wanted]

    def only(active: str | None, *, freeze: bool = s.freeze_idle) -> None:
        """Let the processes of `active` run and (with `freeze`) freeze every other system's."""
        keep = {id(g) for g in systems[active].cpu_groups} if active else set()
        groups = {id(g): g for sysm in systems.values() for g in sysm.cpu_groups}
        for gid, g in groups.items():
            if gid in keep or not freeze:
                g.resume()
            else:
                g.pause()

    def resume_all() -> None:
        only(None, freeze=False)

    try:
        # 1. Start each system alone and wait until it is ready (startup timed without company).
        for name in order:
            if name == "model_direct":
                continue
            cls = {"inproc": InprocSystem, "vllm_serve": VllmServeSystem, "pair": PairSystem}.get(name)
            system = cls(ctx) if cls else VllmGrpcSystem(ctx, prompts)
            only(None)  # the systems started so far stay frozen while this one starts
            systems[name] = system
            log(f"model: starting {name} (logs: {system.log_path('*')})")
            system.start()
            try:
                await system.wait_ready(s.start_timeout_s)
            except Exception as e:  # noqa: BLE001
                if name == "vllm_grpc":  # optional: report why and go on without it
                    log(f"model: vllm_grpc failed to start, skipped: {e}")
                    results["vllm_grpc"] = {"skipped": f"failed to start: {e}"[:2000]}
                    await system.close()
                    del systems[name]
                    continue
                raise
            results[name] = {"description": system.description, "startup": system.startup,
                             "pids": system.pids(), "memory_at_ready": _memory(system)}
            log(f"model: {name} ready: " + ", ".join(f"{k} {v:.1f}s" for k, v in system.startup.items()))
        # 2. model_direct / vllm_grpc: the images of set B, preprocessed once by the pair.
        if "model_direct" in order or "vllm_grpc" in systems:
            from vlm.client import PreprocessorClient

            pair = systems["pair"]
            only("pair")
            b_images = [*plan_b["warmup_seq"], *plan_b["warmup_round"], *[i for v in plan_b["rounds"].values() for i in v]]
            t0 = time.perf_counter()
            async with PreprocessorClient(pair.pre_target) as pc:
                for i in b_images:
                    prompts[i] = await pair_preprocess(pc, ctx["jpegs"][i])
            results["preprocessed_prompts"] = {"count": len(b_images), "seconds": time.perf_counter() - t0,
                                               "prompt_tokens": len(prompts[b_images[0]].token_ids)}
            if "model_direct" in order:
                md = ModelDirectSystem(ctx, pair, prompts)
                await md.wait_ready(0)
                systems["model_direct"] = md
                results["model_direct"] = {"description": md.description, "startup": {}}
        active = [n for n in order if n in systems]
        plans = {n: plan_b if n in ("model_direct", "vllm_grpc") else plan_a for n in active}
        # 3. Warm-up, one system after the other.
        for name in active:
            log(f"model: warming up {name}")
            only(name)
            results[name]["first_request_s"], results[name]["first_output"] = await _warm(systems[name], plans[name])
        # 4. Alternating rounds.
        recs: dict[str, list[dict[str, Any]]] = {n: [] for n in active}
        meter = CpuMeter()
        cpu: dict[tuple[str, int], dict[str, float]] = {}
        for r in range(s.rounds):
            for c in s.concurrency:
                for name in active:
                    system = systems[name]
                    only(name)
                    if s.freeze_idle:
                        await asyncio.sleep(0.2)  # let the thawed processes settle
                    before = meter.read(system.cpu_groups)
                    wall, reqs = await system.run_round(plans[name]["rounds"][(r, c)])
                    used = CpuMeter.diff(before, meter.read(system.cpu_groups))
                    rec = round_record(r, c, wall, reqs)
                    rec["cpu_s"] = used
                    recs[name].append(rec)
                    acc = cpu.setdefault((name, c), {})
                    for k, v in used.items():
                        acc[k] = acc.get(k, 0.0) + v
                    await asyncio.sleep(s.gap_s)
            log(f"model: round {r + 1}/{s.rounds}: " + ", ".join(
                f"{n} {recs[n][-1]['output_tok_s']:.0f}" for n in active) + f" tok/s at N={s.concurrency[-1]}")
        resume_all()
        for name in active:
            results[name]["rounds"] = recs[name]
            results[name]["levels"] = {str(c): summarize([x for x in recs[name] if x["concurrency"] == c])
                                       for c in s.concurrency}
            for c in s.concurrency:  # CPU per request by process role, over all rounds at this N
                n_req = s.rounds * c
                results[name]["levels"][str(c)]["cpu_ms_per_request"] = {
                    k: v * 1000 / n_req for k, v in sorted(cpu[(name, c)].items(), key=lambda kv: -kv[1])}
            if name in systems and systems[name].groups:
                results[name]["memory_at_end"] = _memory(systems[name])
        if "pair" in systems:
            for svc, text in (await systems["pair"].scrape_metrics()).items():
                path = Path(ctx["out_dir"]) / f"{NAME}.pair.{svc}.metrics.txt"
                path.write_text(text)
                results["pair"].setdefault("metrics_files", {})[svc] = str(path)
        # 5. Optional: where does the pair spend its time?
        if py_spy_s > 0 and "pair" in systems:
            log(f"model: py-spy on the pair for {py_spy_s:.0f}s at N=4")
            data["py_spy"] = await _profile(systems["pair"], ctx, py_spy_s, Path(ctx["out_dir"]))
    finally:
        resume_all()
        for name in reversed(list(systems)):
            try:
                await systems[name].close()
            except Exception as e:  # noqa: BLE001
                log(f"model: closing {name} failed: {e}")


def _prepare(model_dir: Path, env: dict[str, str], out_dir: Path) -> float:
    """Fill vLLM's model-inspection cache once (else the first system to start pays a 25-30 s
    inspection subprocess that the others do not)."""
    t0 = time.perf_counter()
    code = ("import sys; from vlm.testing.tiny_models import warm_vllm_model_info_cache as w; "
            "sys.exit(0 if w(sys.argv[1]) else 1)")
    with open(out_dir / f"{NAME}.prepare.log", "w") as logf:
        rc = subprocess.run([sys.executable, "-c", code, str(model_dir)], cwd=REPO_ROOT, env=env,
                            stdout=logf, stderr=subprocess.STDOUT, timeout=300, check=False).returncode
    if rc != 0:
        log("model: warming vLLM's model-info cache failed (startups then include an inspection subprocess)")
    return time.perf_counter() - t0


def run(*, quick: bool = False, out_dir: Path = DEFAULT_OUT, rounds: int | None = None,
        systems: list[str] | None = None, py_spy_s: float = 0.0, gap_s: float | None = None,
        freeze_idle: bool = True, preprocessor_args: Sequence[str] = ()) -> dict[str, Any]:
    from bench.model_systems import TEXT, child_env, raw_prompt
    from vlm.testing.tiny_models import build_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    s = dataclasses.replace(settings(quick, rounds), freeze_idle=freeze_idle)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = list(systems or ALL_SYSTEMS)
    t_all = time.perf_counter()
    env = child_env()
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if s.engine_multiprocessing else "0")
    if gap_s is not None or s.gap_s is None:
        s = dataclasses.replace(s, gap_s=gap_s if gap_s is not None else
                                (0.3 if env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" else 1.5))
    data: dict[str, Any] = {
        "benchmark": NAME,
        "quick": quick,
        "settings": asdict(s),
        "systems_requested": wanted,
        "prompt": {"chat_text": TEXT},
        "engine_kwargs": engine_kwargs(),
        "preprocessor_args": list(preprocessor_args),
        "machine": machine_info(),
        "systems": {},
    }
    for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        data["machine"]["env"][k] = env.get(k)
    with tempfile.TemporaryDirectory(prefix="vlm-bench-model-") as tmp_s:
        tmp = Path(tmp_s)
        model_dir = build_tiny_model("llava", tmp / "tiny-llava")
        images = tmp / "images"
        images.mkdir()
        n_set = 2 * s.images_per_set()
        n = n_set + (64 if py_spy_s > 0 else 0)
        log(f"model: generating {n} synthetic {s.image_size[0]}x{s.image_size[1]} JPEGs")
        jpegs = synthetic_jpegs(n, s.image_size, seed0=10_000)
        for i, jpeg in enumerate(jpegs):
            (images / f"{i:04d}.jpg").write_bytes(jpeg)
        data["prompt"]["inproc"] = raw_prompt(model_dir)
        ctx = {
            "raw_prompt": data["prompt"]["inproc"],
            "model_dir": model_dir, "images": images, "jpegs": jpegs, "engine_kwargs": engine_kwargs(),
            "max_tokens": s.max_tokens, "out_dir": out_dir, "env": env,
            "profile_images": list(range(n_set, n)),
            "preprocessor_args": list(preprocessor_args),
        }
        if "inproc" in wanted:  # started first: it fills vLLM's model-info cache, outside its timing
            ctx["warm_model_info"] = True
        else:
            data["prepare_s"] = _prepare(model_dir, env, out_dir)
        asyncio.run(_run_systems(s, ctx, wanted, data, py_spy_s))
    data["ratios"] = ratios(data)
    data["output_check"] = output_check(data)
    data["total_s"] = time.perf_counter() - t_all
    md = render_markdown(data)
    paths = write_results(out_dir, NAME, data, md)
    print(md, flush=True)
    log(f"model: done in {data['total_s']:.0f}s; wrote {paths[0]} and {paths[1]}")
    return data


def ratios(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for a, b, c, key in (
        ("pair", "vllm_serve", 4, "output_tok_s"),
        ("pair", "inproc", 4, "output_tok_s"),
        ("pair", "vllm_serve", 1, "ttft_p50"),
        ("pair", "vllm_serve", 4, "ttft_p50"),
        ("model_direct", "vllm_grpc", 4, "output_tok_s"),
        ("model_direct", "vllm_grpc", 4, "ttft_p50"),
        ("vllm_serve", "inproc", 4, "output_tok_s"),
        ("pair", "inproc", 1, "ttft_p50"),
    ):
        r = paired_ratio(data, a, b, c, key)
        if r is not None:
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _lvl(sysd: dict[str, Any], c: int) -> dict[str, Any] | None:
    return sysd.get("levels", {}).get(str(c)) if sysd else None


def render_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    sysd = data["systems"]
    names = [n for n in ALL_SYSTEMS if n in sysd and "levels" in sysd[n]]
    skipped = {n: sysd[n]["skipped"] for n in ALL_SYSTEMS if n in sysd and "skipped" in sysd[n]}

    def cell_tok(n: str, c: int) -> str:
        lv = _lvl(sysd[n], c)
        if not lv or lv["output_tok_s"]["best"] is None:
            return "–"
        t = lv["output_tok_s"]
        return f"{t['best']:.0f} ({t['min']:.0f}–{t['max']:.0f})" if lv["rounds"] > 1 else f"{t['best']:.0f}"

    def cell_ttft(n: str, c: int, q: str) -> str:
        lv = _lvl(sysd[n], c)
        if not lv:
            return "–"
        v = lv["ttft"][f"{q}_ms"]
        if q == "p50" and lv["rounds"] > 1 and lv["ttft_p50_ms_rounds"]["min"] is not None:
            r = lv["ttft_p50_ms_rounds"]
            return f"{fmt(v, 0)} ({r['min']:.0f}–{r['max']:.0f})"
        return fmt(v, 0)

    rows = []
    rows.append(["startup to ready (s)", *[fmt(sysd[n].get("startup", {}).get("ready_s")) for n in names]])
    rows.append(["first request after startup (s)", *[fmt(sysd[n].get("first_request_s"), 2) for n in names]])
    for c in s["concurrency"]:
        rows.append([f"**output tok/s @ N={c}**: best (min–max)", *[cell_tok(n, c) for n in names]])
        rows.append([f"TTFT p50 @ N={c} (ms): all requests (round medians min–max)",
                     *[cell_ttft(n, c, "p50") for n in names]])
        rows.append([f"TTFT p95 @ N={c} (ms)", *[cell_ttft(n, c, "p95") for n in names]])
        rows.append([f"time per output token p50 @ N={c} (ms)",
                     *[fmt((_lvl(sysd[n], c) or {}).get("tpot", {}).get("p50_ms"), 2) for n in names]])
    c0 = s["concurrency"][0]
    rows.append(["prompt tokens / output tokens per request",
                 *[f"{(_lvl(sysd[n], c0) or {}).get('prompt_tokens')} / {(_lvl(sysd[n], c0) or {}).get('tokens_per_request')}"
                   for n in names]])

    def mem(n: str) -> str:
        m = sysd[n].get("memory_at_end") or {}
        if not m:
            return "(pair's)" if n == "model_direct" else "–"
        return f"{sum(v['rss_mb'] or 0 for v in m.values()):.0f} / {sum(v['pss_mb'] or 0 for v in m.values()):.0f}"

    rows.append(["RSS / PSS of its processes at the end (MiB)", *[mem(n) for n in names]])

    rrows = []
    for r in data.get("ratios", []):
        fig = "output tok/s (best round)" if r["figure"] == "output_tok_s" else "TTFT p50"
        pr = (f"{r['per_round_median']:.2f}× ({r['per_round_min']:.2f}–{r['per_round_max']:.2f})"
              if r["per_round"] else "–")
        rrows.append([f"{r['a']} / {r['b']}", f"{fig} @ N={r['concurrency']}",
                      "–" if r["ratio"] is None else f"**{r['ratio']:.2f}×**", pr])

    cpu_rows = []
    cmax = s["concurrency"][-1]
    for n in names:
        lv = _lvl(sysd[n], cmax) or {}
        cpu = lv.get("cpu_ms_per_request") or {}
        if cpu:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v >= 0.5)
            cpu_rows.append([n, f"{sum(cpu.values()):.0f}", parts])
    st_rows = []
    for n in names:
        st = sysd[n].get("startup") or {}
        if st:
            st_rows.append([n, ", ".join(f"{k} {v:.1f}" for k, v in st.items())])
    mp = data["machine"]["env"].get("VLLM_ENABLE_V1_MULTIPROCESSING")
    layout = "in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)" if mp == "0" else "multiprocess engine"
    frozen = ", the others frozen (SIGSTOP) while one system runs" if s.get("freeze_idle") else ""
    lines = [
        "## Serving path: gRPC pair vs. vLLM's OpenAI server vs. in-process AsyncLLM",
        "",
        (f"Tiny LLaVA on CPU, {layout}, float32, enforce_eager, VLLM_CPU_KVCACHE_SPACE=1; greedy, ignore_eos, "
         f"{s['max_tokens']} tokens per request, one distinct {s['image_size'][0]}×{s['image_size'][1]} JPEG per "
         f"request; every system is its own OS process(es); {s['rounds']} alternating round(s) per N, "
         f"{s['gap_s']:.1f} s between systems{frozen}{' (QUICK: smoke settings)' if data['quick'] else ''}; "
         f"{data['machine']['cpu_count']} CPUs, load average {fmt(data['machine']['loadavg_1m'], 2)} at start; "
         f"run took {fmt(data.get('total_s'), 0)} s."
         + (f" The pair's preprocessor also had `{' '.join(data['preprocessor_args'])}`."
            if data.get("preprocessor_args") else "")),
        "",
        md_table(["figure", *names], rows),
        "",
        ("tok/s per round = Σ output tokens / round wall time; *best* = the best round (noise only slows), "
         "(min–max) over rounds. TTFT = request start (before the client encodes the image) to the first token."),
        "",
        "Ratios (same run; the per-round column pairs rounds measured back to back):",
        "",
        md_table(["ratio", "figure", "value", "per round: median (min–max)"], rrows),
        "",
        (f"CPU time per request at N={cmax} (ms, user + system, all rounds; from the processes' own counters, "
         "read between rounds; the driver runs the clients of every system but inproc, and model_direct is charged "
         "with the whole pair, whose preprocessor then idles):"),
        "",
        md_table(["system", "total", "by process"], cpu_rows),
        "",
        ("Startup (s, from spawning the process(es) to ready; the pair's two services start together, "
         "`ready_s` = the later of the two):"),
        "",
        md_table(["system", "startup"], st_rows),
    ]
    if data.get("output_check"):
        lines += ["", "Same greedy output for the first warm-up image: " + ", ".join(
            f"{k}: {'yes' if v else '**NO**'}" for k, v in data["output_check"].items())]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"**{k}**: {v}" for k, v in skipped.items())]
    spy = data.get("py_spy")
    if spy and "skipped" not in spy:
        lines += ["", (f"py-spy on the pair at N=4 for {spy['seconds']:.0f} s ({spy['requests']} requests; 100 Hz; "
                       "a sample = a thread seen running or runnable, i.e. on a CPU or waiting for one; raw stacks: "
                       "the JSON's `py_spy` paths):"), ""]
        prow = []
        for svc in ("preprocessor_svc", "model_svc"):
            for label, d in ((spy.get(svc) or {}).get("processes") or {}).items():
                leaf = ", ".join(f"`{x['frame'][:70]}` {x['samples']}" for x in d["top_leaf"][:3])
                own = ", ".join(f"`{x['frame'][:70]}` {x['samples']}" for x in d["top_project"][:3])
                prow.append([label, d["samples"], leaf, own])
        lines.append(md_table(["process", "samples", "top leaf frames", "deepest project frames"], prow))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model_latency", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke-test settings (3 rounds, 1 warm-up request)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default: 3 quick, 10 full)")
    p.add_argument("--gap", type=float, default=None, metavar="SECONDS",
                   help="pause between two systems' rounds (default 1.5 s, as vLLM's multiprocess engine spins "
                        "1 s after use; 0.3 s with the in-process layout)")
    p.add_argument("--no-freeze", action="store_true",
                   help="leave the idle systems running during another system's rounds (default: SIGSTOP them)")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                   help=f"comma-separated subset of {','.join(ALL_SYSTEMS)} (default: all available)")
    p.add_argument("--preprocessor-args", default="", metavar="ARGS",
                   help="extra flags for the pair's `vlm serve-preprocessor`, e.g. '--worker-depth 2'")
    p.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                   help="after the rounds, profile both pair services with py-spy for SECONDS at N=4")
    args = p.parse_args(argv)
    wanted = [x.strip() for x in args.systems.split(",") if x.strip()]
    bad = [x for x in wanted if x not in ALL_SYSTEMS]
    if bad:
        p.error(f"unknown system(s): {', '.join(bad)}")
    run(quick=args.quick, out_dir=args.out, rounds=args.rounds, systems=wanted, py_spy_s=args.py_spy, gap_s=args.gap,
        freeze_idle=not args.no_freeze, preprocessor_args=shlex.split(args.preprocessor_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
