"""The `vlm` command-line clients against the real llava pipeline, and real `vlm serve-model`
and `vlm serve-preprocessor` processes, end to end, shut down by SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import png
from vlm.errors import UpstreamError
from vlm.testing.tiny_models import SPECS

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

VLM = [sys.executable, "-m", "vlm_cli.main"]


async def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run, [*VLM, *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cat.png"
    path.write_bytes(png(3))
    return path


async def test_preprocess_json_contract(llava_pipeline, image_file) -> None:
    tok = SPECS["llava"].image_token
    res = await _run("preprocess", "--target", llava_pipeline.pre_target,
                     "--prompt", f"{tok}\nWhat is this?", "--image", str(image_file), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"token_ids", "items"}
    (item,) = out["items"]
    assert item["modality"] == "image" and len(item["hash"]) >= 32
    assert item["is_embed"] is None and item["length"] == 16
    assert out["token_ids"][item["offset"]:item["offset"] + item["length"]] == [480] * 16
    assert item["fields"]["pixel_values"] == {"dtype": "float32", "shape": [3, 32, 32]}


async def test_generate_json_contract(llava_pipeline, image_file, tmp_path) -> None:
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps([
        {"role": "user", "content": [{"type": "image", "path": str(image_file)},
                                     {"type": "text", "text": "Describe it."}]},
    ]))
    res = await _run("generate", "--target", llava_pipeline.pre_target, "--messages", str(messages),
                     "--max-tokens", "5", "--temperature", "0", "--ignore-eos", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 5 and out["usage"]["prompt_tokens"] > 16
    assert isinstance(out["text"], str)


async def test_cli_error_exit_status_and_code_name(llava_pipeline, image_file) -> None:
    # Two placeholders, one image: the preprocessor refuses it.
    tok = SPECS["llava"].image_token
    res = await _run("preprocess", "--target", llava_pipeline.pre_target,
                     "--prompt", f"{tok}{tok} hi", "--image", str(image_file))
    assert res.returncode == 1
    assert res.stderr.startswith("INVALID_ARGUMENT:"), res.stderr


async def test_health_command(llava_pipeline) -> None:
    res = await _run("health", "--target", llava_pipeline.model_target)
    assert res.returncode == 0 and res.stdout.strip() == "SERVING"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_serving(proc: subprocess.Popen, target: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    status = ""
    from vlm.client import check_health

    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status = await check_health(target, timeout=5)
        except UpstreamError as e:
            status = e.code.name
        if status == "SERVING":
            return
        await asyncio.sleep(0.5)
    detail = proc.stderr.read()[-3000:] if proc.poll() is not None else status
    raise AssertionError(f"{target} not SERVING: {detail}")


async def test_serve_commands_as_processes_end_to_end_and_sigterm(llava_pipeline, image_file, tmp_path) -> None:
    """Both services as users run them: `vlm serve-model --dtype float32` and `vlm
    serve-preprocessor --model-target` with default flags, started at the same time (the
    preprocessor waits for the model service's handshake), a generation through both, the same
    GetModelInfo on both, then SIGTERM: both exit 0."""
    model_port, pre_port = _free_port(), _free_port()
    model_dir = str(llava_pipeline.model_dir)
    model = subprocess.Popen(
        [*VLM, "serve-model", "--model", model_dir, "--port", str(model_port), "--metrics-port", "-1",
         "--max-model-len", "1024", "--enforce-eager", "--dtype", "float32", "--seed", "0",
         "--kv-cache-memory-bytes", str(128 << 20), "--grace", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    pre = subprocess.Popen(
        # Default flags: the feature dtype (float32, where --dtype auto alone would give
        # bfloat16) and the max length come from the model service's handshake.
        [*VLM, "serve-preprocessor", "--model", model_dir, "--port", str(pre_port),
         "--metrics-port", "-1", "--workers", "1",
         "--model-target", f"127.0.0.1:{model_port}", "--grace", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        await _wait_serving(pre, f"127.0.0.1:{pre_port}")
        await _wait_serving(model, f"127.0.0.1:{model_port}")
        messages = tmp_path / "chat.json"
        messages.write_text(json.dumps([
            {"role": "user", "content": [{"type": "image", "path": str(image_file)},
                                         {"type": "text", "text": "Describe it."}]},
        ]))
        res = await _run("generate", "--target", f"127.0.0.1:{pre_port}", "--messages", str(messages),
                         "--max-tokens", "5", "--temperature", "0", "--ignore-eos", "--json")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        # Same greedy tokens as the in-process pair of the same model.
        ref = await _run("generate", "--target", llava_pipeline.pre_target, "--messages", str(messages),
                         "--max-tokens", "5", "--temperature", "0", "--ignore-eos", "--json")
        assert out["token_ids"] == json.loads(ref.stdout)["token_ids"]
        from vlm.client import ModelClient, PreprocessorClient

        async with PreprocessorClient(f"127.0.0.1:{pre_port}") as p, ModelClient(f"127.0.0.1:{model_port}") as m:
            assert await p.model_info() == await m.model_info()
            # SIGTERM on the gateway mid-stream: NOT_SERVING and new requests refused at once,
            # the stream in flight completes, then the process exits 0.
            from vlm import types

            prompt = types.PromptInput(text="Tell me a long story.")
            stream = p.generate(prompt, types.Sampling(temperature=0.0, max_tokens=200, ignore_eos=True))
            first = await anext(stream)
            pre.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while True:  # the signal is handled within a moment; from then on, refused
                try:
                    await p.model_info()
                except UpstreamError as err:
                    assert err.code.name == "UNAVAILABLE"
                    break
                assert time.monotonic() - signalled < 1.0, "still accepting requests after SIGTERM"
                await asyncio.sleep(0.05)
            rest = [c async for c in stream]
            assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 200
            ended = time.monotonic()
            assert await asyncio.to_thread(pre.wait, 30) == 0
            assert time.monotonic() - ended < 2.5
        model.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(model.wait, 90) == 0
    finally:
        for proc in (pre, model):
            if proc.poll() is None:
                proc.kill()
