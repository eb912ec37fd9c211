"""`vlm demo`: the whole pipeline on this machine, offline.

Builds a tiny random-weight LLaVA (config classes + a `tokenizers` tokenizer, no download),
starts `vlm serve-model` and `vlm serve-preprocessor` as real processes on loopback, waits for
both to report SERVING, then preprocesses and streams a generation for a chat prompt with an
image, shows the hash-only resend on a second request, scrapes both `/metrics` endpoints, and
shuts both services down with SIGTERM. The model's weights are random, so its text is noise;
the point is the plumbing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from vlm import types


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_image(seed: int = 0) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (20 + seed * 40 % 200, 60, 140))
    draw = ImageDraw.Draw(img)
    draw.ellipse((80, 40, 240, 200), fill=(240, 200, 40))
    draw.rectangle((10, 180, 120, 230), fill=(30, 200, 90))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def _wait_serving(target: str, proc: subprocess.Popen, timeout: float) -> None:
    from vlm.client import check_health
    from vlm.errors import VlmError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service at {target} exited with {proc.returncode}")
        try:
            if await check_health(target, timeout=2) == "SERVING":
                return
        except VlmError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{target} not SERVING after {timeout:.0f}s")


async def _run(args: argparse.Namespace, model_dir: Path) -> None:
    from vlm.client import PreprocessorClient

    model_port, pre_port = _free_port(), _free_port()
    model_metrics, pre_metrics = _free_port(), _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    cli = [sys.executable, "-m", "vlm_cli.main"]
    model_cmd = [
        *cli, "serve-model", "--model", str(model_dir), "--port", str(model_port),
        "--metrics-port", str(model_metrics), "--max-model-len", "2048", "--enforce-eager",
        "--dtype", "float32",
    ]
    pre_cmd = [
        *cli, "serve-preprocessor", "--model", str(model_dir), "--port", str(pre_port),
        "--metrics-port", str(pre_metrics), "--workers", str(args.workers), "--dtype", "float32",
        "--model-target", f"127.0.0.1:{model_port}",
    ]
    procs = []
    try:
        print(f"[demo] starting model service on 127.0.0.1:{model_port} (vLLM engine)...", flush=True)
        procs.append(subprocess.Popen(model_cmd, env=env))
        print(f"[demo] starting preprocessor on 127.0.0.1:{pre_port}...", flush=True)
        procs.append(subprocess.Popen(pre_cmd, env=env))
        await _wait_serving(f"127.0.0.1:{pre_port}", procs[1], args.timeout)
        await _wait_serving(f"127.0.0.1:{model_port}", procs[0], args.timeout)
        print("[demo] both services SERVING", flush=True)

        image = types.Media(types.Modality.IMAGE, _demo_image(), "image/png")
        chat = types.PromptInput(messages=(
            types.ChatMessage("user", (types.ChatPart(media=image), types.ChatPart(text="What is in this image?"))),
        ))
        sampling = types.Sampling(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        async with PreprocessorClient(f"127.0.0.1:{pre_port}") as client:
            prompt = await client.preprocess(chat)
            for item in prompt.items:
                fields = {n: (tuple(f.data.shape), str(f.data.dtype)) for n, f in (item.fields or {}).items()}
                print(f"[demo] preprocess: {len(prompt.token_ids)} tokens; {item.modality.value} at "
                      f"offset {item.placeholder.offset} length {item.placeholder.length} "
                      f"hash {item.hash[:16]}… fields {fields}")
            for attempt in (1, 2):
                print(f"[demo] generate #{attempt}: ", end="", flush=True)
                last = None
                async for chunk in client.generate(chat, sampling):
                    print(chunk.text, end="", flush=True)
                    last = chunk
                u = last.usage
                print(f"\n[demo]   finish={last.finish_reason.value} prompt_tokens={u.prompt_tokens} "
                      f"completion_tokens={u.completion_tokens} cached_tokens={u.cached_tokens}")
        for name, port in (("model", model_metrics), ("preprocessor", pre_metrics)):
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            picked = [line for line in body.splitlines()
                      if line.startswith(("vlm_time_to_first_token_seconds_count", "vlm_generation_tokens_total",
                                          "vlm_feature_store_hits_total", "vlm_preprocess_items_total",
                                          "vlm_processor_cache_hits_total"))]
            print(f"[demo] {name} /metrics: " + "; ".join(picked))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        print("[demo] services stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where to build the tiny model (default: a temp dir)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="start-up timeout, seconds")
    args = parser.parse_args(argv)

    from vlm.testing.tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="vlm-demo-") as tmp:
        model_dir = build_tiny_model("llava", args.model_dir or Path(tmp) / "tiny-llava")
        print(f"[demo] tiny LLaVA built offline at {model_dir}")
        asyncio.run(_run(args, model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
