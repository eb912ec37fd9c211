"""The `vlm` command-line clients against the real llava pipeline, and a real
`vlm serve-preprocessor` process shut down by SIGTERM."""

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


async def test_serve_preprocessor_process_sigterm_is_graceful(llava_pipeline) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [*VLM, "serve-preprocessor", "--model", str(llava_pipeline.model_dir), "--port", str(port),
         "--metrics-port", "-1", "--workers", "1", "--dtype", "float32", "--grace", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        status = ""
        while time.monotonic() < deadline and proc.poll() is None:
            res = await _run("health", "--target", f"127.0.0.1:{port}", timeout=30)
            status = res.stdout.strip()
            if status == "SERVING":
                break
            await asyncio.sleep(1)
        assert status == "SERVING", proc.stderr.read() if proc.poll() is not None else status
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 60)
        assert rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()
