"""Session-wide test settings: offline, CPU-friendly vLLM defaults."""

from __future__ import annotations

import os

# No hub access here; everything is built offline in temp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vLLM on CPU sizes the KV cache from NUMA node 0 unless told (see ENVIRONMENT.md).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys

_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config) -> None:
    """End the process with pytest's own status once everything is reported. The session runs
    vLLM engines, grpc.aio servers and client loop threads in-process; letting the interpreter
    finalize their native objects in arbitrary order can crash it at exit (seen as SIGSEGV,
    intermittently, after every test had passed and every fixture had closed), and a crash at
    exit would also lose the buffered summary. Test outcomes are not affected: the status is
    the one pytest computed."""
    if _exit_status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
