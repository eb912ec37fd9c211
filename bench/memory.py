"""Memory under maximum-size messages: many clients send the largest message a service accepts,
all at once, and the server's peak memory is measured.

    vlm bench memory [--quick]

The preprocessor runs as a real process (`vlm serve-preprocessor`, tiny LLaVA, 1 worker). Each
of N concurrent clients sends a `Preprocess` request just under the 32 MiB message limit: one
image of that size (random bytes, over the 20 MiB image limit: refused once the whole message
was received and deserialized, which is what holds the memory). Rounds at several N, under three
request-memory budgets (`--max-request-memory-bytes`, `vlm.admission`): the default (8 × the
32 MiB message limit: 8 messages read at once), a tight one (2 messages) and one large enough
for every client (what the server did before the budget existed). Reported per round: the
server tree's peak RSS over its idle baseline, the codes, and the peak per message admitted at
once. The bound the README documents is about 2.8 × the budget.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, TreeMemorySampler, log, tree_memory, write_results

NAME = "memory"
MiB = 1 << 20
#: Just under the preprocessor's 32 MiB receive limit, leaving room for the envelope.
PAYLOAD = 32 * MiB - 4096


async def _round(target: str, clients: int, payload: bytes) -> Counter:
    import grpc

    from vlm.common.v1 import multimodal_pb2 as common_pb
    from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb

    req = pre_pb.PreprocessRequest()
    req.prompt.text = "<image> hi"
    media = req.media.add()
    media.modality = common_pb.MODALITY_IMAGE
    media.data = payload
    media.mime_type = "image/jpeg"
    body = req.SerializeToString()
    codes: Counter = Counter()
    opts = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]

    async def one(i: int) -> None:
        # One channel per client: separate connections, as separate users would be.
        async with grpc.aio.insecure_channel(target, options=opts) as ch:
            call = ch.unary_unary(
                "/vlm.preprocessor.v1.PreprocessorService/Preprocess",
                request_serializer=lambda b: b, response_deserializer=lambda b: b,
            )
            try:
                await call(body, timeout=120)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1

    await asyncio.gather(*(one(i) for i in range(clients)))
    return codes


def _start(model_dir: Path, port: int, work: Path, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vlm_cli.main", "serve-preprocessor", "--model", str(model_dir),
         "--port", str(port), "--metrics-port", "-1", "--workers", "1", "--grace", "2", *extra],
        stdout=(work / f"preprocessor{'-'.join(['', *extra])}.log").open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )


def _wait_serving(target: str, proc: subprocess.Popen) -> None:
    from vlm.client import check_health
    from vlm.errors import UpstreamError

    t = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the preprocessor exited during start-up")
        try:
            if asyncio.run(check_health(target, timeout=2)) == "SERVING":
                return
        except UpstreamError:
            pass
        if time.monotonic() - t > 300:
            raise RuntimeError("not SERVING after 300 s")
        time.sleep(1)


def run(*, quick: bool = False, out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    from bench.model_systems import free_port
    from vlm.testing.tiny_models import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="vlm-memory-"))
    model_dir = build_tiny_model("llava", work / "llava")
    payload = os.urandom(PAYLOAD)
    levels = (4, 16) if quick else (4, 16, 32)
    rows: list[dict[str, Any]] = []
    budgets = {"default (8 messages)": None, "2 messages": 2 * 32 * MiB,
               "unbounded (every client)": max(levels) * 32 * MiB}
    for label, budget in budgets.items():
        extra = [] if budget is None else ["--max-request-memory-bytes", str(budget)]
        slots = (budget or 8 * 32 * MiB) // (32 * MiB)
        port = free_port()
        target = f"127.0.0.1:{port}"
        proc = _start(model_dir, port, work, extra)
        try:
            _wait_serving(target, proc)
            time.sleep(2)
            base = tree_memory(proc.pid, pss=False)["rss_mb"]
            for clients in levels:
                sampler = TreeMemorySampler(proc.pid, interval_s=0.05, pss_every=10 ** 9).start()
                t = time.perf_counter()
                codes = asyncio.run(_round(target, clients, payload))
                wall = time.perf_counter() - t
                time.sleep(0.5)
                peak = sampler.stop()["peak_rss_mb"]
                after = tree_memory(proc.pid, pss=False)["rss_mb"]
                concurrent = min(clients, slots)
                row = {
                    "budget": label, "admitted_at_once": concurrent, "clients": clients,
                    "message_mib": PAYLOAD / MiB, "baseline_rss_mb": base, "peak_rss_mb": peak,
                    "peak_over_baseline_mb": peak - base, "after_rss_mb": after,
                    "per_admitted_message_mb": (peak - base) / concurrent,
                    "codes": dict(codes), "wall_s": wall,
                }
                rows.append(row)
                log(f"memory: budget={label} clients={clients}: peak +{peak - base:.0f} MB "
                    f"({row['per_admitted_message_mb']:.1f} MB per admitted message), {dict(codes)}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    md = [
        "## Memory: concurrent maximum-size Preprocess messages (32 MiB) against one preprocessor process",
        "",
        "| request-memory budget | clients | read at once | baseline RSS | peak RSS | peak − baseline "
        "| per message read at once | RSS after | codes | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['budget']} | {r['clients']} | {r['admitted_at_once']} | "
            f"{r['baseline_rss_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | "
            f"{r['peak_over_baseline_mb']:.0f} MB | {r['per_admitted_message_mb']:.1f} MB | "
            f"{r['after_rss_mb']:.0f} MB | {r['codes']} | {r['wall_s']:.1f} s |"
        )
    md += ["", f"Logs: `{work}`."]
    data = {"name": NAME, "quick": quick, "rows": rows, "logs": str(work)}
    write_results(out_dir, NAME, data, "\n".join(md))
    print("\n".join(md))
    return data


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
