"""Soak: N concurrent streaming clients for T seconds against the running pair, on loopback.

    vlm bench soak [--quick]          # 64 streams × 60 s (quick: 16 × 10 s)

Both services run as real processes (`vlm serve-model`, `vlm serve-preprocessor
--model-target`) on a tiny Qwen2-VL built offline (it takes images and videos). Each client
loops until the time is up, cycling through a traffic mix: a new image, a repeated image (the
hash-only path), a video, an image with a video, text only, and a request it cancels after the
first chunk. Every request has a deadline; nothing is retried.

Reported: sent, completed, cancelled (on purpose), failed by status code, **lost** (a stream
that ended with neither a finish reason nor an error), **hung** (no end within the request's
deadline), unexpected codes (anything but RESOURCE_EXHAUSTED, which is backpressure), and TTFT
p50/p99 of the completed requests. The target on the 2-core CI machine: 0 lost, 0 hung, no
unexpected codes. `run_soak` is also what the test suite's 16 × 10 s version calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, log, write_results

NAME = "soak"

#: Status codes that are part of normal operation under load (backpressure).
EXPECTED_CODES = frozenset({"RESOURCE_EXHAUSTED"})

KINDS = ("image_new", "image_repeat", "video", "image_video", "text", "cancel")


@dataclasses.dataclass
class SoakResult:
    streams: int
    seconds: float
    sent: int = 0
    completed: int = 0
    cancelled: int = 0
    lost: int = 0
    hung: int = 0
    failed: Counter = dataclasses.field(default_factory=Counter)
    by_kind: Counter = dataclasses.field(default_factory=Counter)
    ttft_s: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0

    @property
    def unexpected(self) -> dict[str, int]:
        return {c: n for c, n in self.failed.items() if c not in EXPECTED_CODES}

    def summary(self) -> dict[str, Any]:
        ttft = sorted(self.ttft_s)

        def pct(p: float) -> float | None:
            return ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else None

        return {
            "streams": self.streams, "seconds": self.seconds, "sent": self.sent,
            "completed": self.completed, "cancelled": self.cancelled,
            "failed": dict(self.failed), "unexpected": self.unexpected,
            "lost": self.lost, "hung": self.hung, "by_kind": dict(self.by_kind),
            "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99),
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
        }


def _jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    import numpy as np
    from PIL import Image

    w, h = size
    ramp = np.add.outer(np.arange(h), np.arange(w) * (1 + seed % 7)) % 256
    img = np.stack([ramp, ramp[::-1], np.full_like(ramp, seed * 37 % 256)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _mp4(seed: int, frames: int = 4, size: int = 64) -> bytes:
    import cv2
    import numpy as np

    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (size, size))
        for k in range(frames):
            base = np.stack([xx, yy, (xx + yy + k / frames) % 1.0], axis=-1) * 200
            writer.write((base + rng.randint(0, 56, (size, size, 3))).astype(np.uint8))
        writer.release()
        return Path(path).read_bytes()


def _prompt(kind: str, seq: int, *, image_text: str, video_text: str | None, repeat: Sequence[bytes],
            video: bytes | None):
    from vlm import types

    img = types.Modality.IMAGE
    if kind == "text":
        return types.PromptInput(text=f"Request {seq}: tell me something.")
    if kind in ("video", "image_video"):
        assert video is not None and video_text is not None
        media = [types.Media(types.Modality.VIDEO, video)]
        text = video_text
        if kind == "image_video":
            media.insert(0, types.Media(img, _jpeg(10_000 + seq)))
            text = image_text + text
        return types.PromptInput(text=text + " Describe.", media=tuple(media))
    data = repeat[seq % len(repeat)] if kind == "image_repeat" else _jpeg(10_000 + seq)
    return types.PromptInput(text=image_text + " What is it?", media=(types.Media(img, data),))


async def run_soak(
    target: str,
    *,
    streams: int,
    seconds: float,
    image_text: str,
    video_text: str | None = None,
    max_tokens: int = 16,
    request_timeout_s: float = 60.0,
    kinds: Sequence[str] = KINDS,
) -> SoakResult:
    """Drive the preprocessor at `target` (see the module docstring)."""
    from vlm import types
    from vlm.client import PreprocessorClient
    from vlm.errors import UpstreamError

    if video_text is None:
        kinds = [k for k in kinds if "video" not in k]
    video = _mp4(1) if video_text is not None else None
    repeat = [_jpeg(s) for s in range(4)]
    sampling = types.Sampling(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    res = SoakResult(streams, seconds)
    seq = itertools.count()
    deadline = time.monotonic() + seconds

    async def one(client: PreprocessorClient, kind: str, n: int) -> None:
        prompt = _prompt(kind, n, image_text=image_text, video_text=video_text, repeat=repeat, video=video)
        res.sent += 1
        res.by_kind[kind] += 1
        start = time.monotonic()
        first: float | None = None
        finished = False
        stream = client.generate(prompt, sampling)
        try:
            async with asyncio.timeout(request_timeout_s):
                async for chunk in stream:
                    if first is None:
                        first = time.monotonic()
                        if kind == "cancel":
                            break
                    res.tokens += len(chunk.token_ids)
                    finished = chunk.finish_reason is not None
        except TimeoutError:
            res.hung += 1
            return
        except UpstreamError as e:
            res.failed[e.code.name] += 1
            return
        finally:
            await stream.aclose()
        if kind == "cancel" and first is not None:
            res.cancelled += 1
        elif finished:
            res.completed += 1
            res.ttft_s.append(first - start)
        else:
            res.lost += 1

    async def client_loop(i: int) -> None:
        async with PreprocessorClient(target) as client:
            for k in itertools.count(i):
                if time.monotonic() >= deadline:
                    return
                await one(client, kinds[k % len(kinds)], next(seq))

    t0 = time.monotonic()
    await asyncio.gather(*(client_loop(i) for i in range(streams)))
    res.seconds = time.monotonic() - t0
    return res


# ------------------------------------------------------------------------ the benchmark proper


def _serving(target: str) -> bool:
    from vlm.client import check_health
    from vlm.errors import UpstreamError

    try:
        return asyncio.run(check_health(target, timeout=2)) == "SERVING"
    except UpstreamError:
        return False


def run(*, quick: bool = False, out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    from bench.model_systems import free_port
    from vlm.testing.tiny_models import SPECS, build_tiny_model

    streams, seconds = (16, 10.0) if quick else (64, 60.0)
    work = Path(tempfile.mkdtemp(prefix="vlm-soak-"))
    model_dir = build_tiny_model("qwen2_vl", work / "qwen2_vl")
    model_port, pre_port = free_port(), free_port()
    vlm = [sys.executable, "-m", "vlm_cli.main"]
    procs = [
        subprocess.Popen(
            [*vlm, "serve-model", "--model", str(model_dir), "--port", str(model_port),
             "--metrics-port", "-1", "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32",
             "--kv-cache-memory-bytes", str(512 << 20), "--max-num-seqs", str(max(64, streams)),
             "--grace", "5"],
            stdout=(work / "model.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True),
        subprocess.Popen(
            [*vlm, "serve-preprocessor", "--model", str(model_dir), "--port", str(pre_port),
             "--metrics-port", "-1", "--workers", "1", "--model-target", f"127.0.0.1:{model_port}",
             "--grace", "5"],
            stdout=(work / "preprocessor.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True),
    ]
    target = f"127.0.0.1:{pre_port}"
    try:
        t = time.monotonic()
        while not _serving(target):
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a service exited during start-up; logs in {work}")
            if time.monotonic() - t > 600:
                raise RuntimeError(f"not SERVING after 600 s; logs in {work}")
            time.sleep(1)
        log(f"soak: pair serving after {time.monotonic() - t:.0f}s; {streams} streams × {seconds:.0f}s")
        spec = SPECS["qwen2_vl"]
        result = asyncio.run(run_soak(target, streams=streams, seconds=seconds,
                                      image_text=spec.image_token, video_text=spec.video_token))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    s = result.summary()
    ok = s["lost"] == 0 and s["hung"] == 0 and not s["unexpected"]
    md = [
        f"## Soak: {streams} streams × {seconds:.0f} s (tiny Qwen2-VL, pair as processes)", "",
        "| sent | completed | cancelled | failed | lost | hung | unexpected | TTFT p50 | TTFT p99 | tok/s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['sent']} | {s['completed']} | {s['cancelled']} | {s['failed'] or 0} | {s['lost']} | {s['hung']} | "
        f"{s['unexpected'] or 0} | {1e3 * (s['ttft_p50_s'] or 0):.0f} ms | {1e3 * (s['ttft_p99_s'] or 0):.0f} ms | "
        f"{s['tokens_per_s']:.0f} | {'PASS' if ok else 'FAIL'} |",
        "", f"By kind: {s['by_kind']}. Logs: `{work}`.",
    ]
    data = {"name": NAME, "quick": quick, **s, "pass": ok, "logs": str(work)}
    write_results(out_dir, NAME, data, "\n".join(md))
    print("\n".join(md))
    return data
