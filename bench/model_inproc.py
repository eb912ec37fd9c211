"""The `inproc` system of `bench.model_latency`: vLLM's `AsyncLLM` in this process, fed raw images.

Started by the driver as its own OS process (`python -m bench.model_inproc ...`), it builds the
engine, reports `ready` and then runs rounds on command. Commands and answers are JSON lines on
two pipes whose descriptors the driver passes (`--cmd-fd`, `--res-fd`); stdout and stderr are
left to vLLM's logging (the driver sends them to a log file).

    {"op": "round", "images": [i, ...]}  ->  {"wall_s": s, "requests": [timing, ...]}
    {"op": "quit"}                       ->  (the engine is shut down, the process exits)

A request's timing starts before the JPEG decode (the pair's preprocessor and vLLM's OpenAI
server decode too) and its first token is the first DELTA output that carries tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any


def _send(fd: int, obj: dict[str, Any]) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]


async def serve(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    from PIL import Image
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    import_s = time.perf_counter() - t0
    warm_s = 0.0
    if args.warm_model_info:
        # Fill vLLM's model-inspection cache for every system of the run (else the first engine to
        # start pays a 25-30 s inspection subprocess). Reported, and left out of the startup.
        from vlm.testing.tiny_models import warm_vllm_model_info_cache

        t = time.perf_counter()
        warm_vllm_model_info_cache(args.model_dir)
        warm_s = time.perf_counter() - t
    jpegs = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))]
    engine_kwargs = json.loads(args.engine_kwargs)
    t1 = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=args.model_dir, **engine_kwargs))
    engine_s = time.perf_counter() - t1
    _send(args.res_fd, {"event": "ready", "import_s": import_s, "engine_s": engine_s, "warm_model_info_s": warm_s})

    async def request(i: int) -> dict[str, Any]:
        start = time.perf_counter()
        with Image.open(io.BytesIO(jpegs[i])) as im:
            image = im.convert("RGB")
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        first, n, ptoks, ids, text = None, 0, None, [], []
        prompt = {"prompt": args.prompt, "multi_modal_data": {"image": image}}
        async for out in llm.generate(prompt, params, f"bench-{uuid.uuid4().hex}"):
            k = len(out.outputs[0].token_ids) if out.outputs else 0
            if k and first is None:
                first = time.perf_counter()
            n += k
            if k:
                ids += out.outputs[0].token_ids
                text.append(out.outputs[0].text)
            if ptoks is None and out.prompt_token_ids is not None:
                ptoks = len(out.prompt_token_ids)
        return {"start": start, "first": first, "end": time.perf_counter(), "tokens": n, "prompt_tokens": ptoks,
                "output": {"token_ids": list(ids), "text": "".join(text)}}

    reader = os.fdopen(args.cmd_fd, "r", buffering=1)
    try:
        while True:
            line = await asyncio.to_thread(reader.readline)
            if not line:
                break  # the driver went away
            cmd = json.loads(line)
            if cmd.get("op") == "quit":
                break
            if cmd.get("op") == "round":
                t = time.perf_counter()
                try:
                    reqs = await asyncio.gather(*(request(i) for i in cmd["images"]))
                    _send(args.res_fd, {"wall_s": time.perf_counter() - t, "requests": list(reqs)})
                except Exception as e:  # noqa: BLE001 - reported to the driver
                    _send(args.res_fd, {"error": f"{type(e).__name__}: {e}"})
    finally:
        llm.shutdown()
        # Drop vLLM's client now: its __del__ at interpreter exit would shut down again when
        # the modules it needs are gone.
        llm = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model_inproc", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--images", required=True, help="folder of *.jpg (sorted by name = index)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--engine-kwargs", required=True, help="AsyncEngineArgs keywords (JSON), model excluded")
    p.add_argument("--warm-model-info", action="store_true",
                   help="fill vLLM's model-info cache after the import (time reported separately)")
    p.add_argument("--cmd-fd", type=int, required=True)
    p.add_argument("--res-fd", type=int, required=True)
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except Exception as e:  # noqa: BLE001
        try:
            _send(args.res_fd, {"event": "error", "error": f"{type(e).__name__}: {e}"})
        except OSError:
            pass
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
