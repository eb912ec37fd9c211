"""`--cpus`: the CPU list syntax and pinning a whole process (threads before and after, children)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from preprocessor_svc.main import build_parser
from vlm.server import parse_cpu_list, pin_to_cpus


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("3", {3}), ("0,2-3", {0, 2, 3}), (" 1 , 4-5 ", {1, 4, 5}), ("2-2", {2})],
)
def test_cpu_lists_use_taskset_syntax(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "1,", "3-1", "-1", "1-x"])
def test_malformed_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="CPU"):
        parse_cpu_list(text)


def test_the_flag_refuses_cpus_this_process_may_not_use(capsys: pytest.CaptureFixture[str]) -> None:
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--cpus", str(missing)])
    assert f"--cpus: CPUs [{missing}] are not available" in capsys.readouterr().err
    assert build_parser().parse_args(["--model", "m", "--cpus", "0"]).cpus == {0}


def test_pinning_covers_existing_threads_and_what_starts_later() -> None:
    """In a fresh interpreter: a thread started before pinning, one started after, and a child
    process all end up on the chosen CPU."""
    cpu = max(os.sched_getaffinity(0))
    code = textwrap.dedent(f"""
        import json, os, subprocess, sys, threading
        from vlm.server import pin_to_cpus

        go = threading.Event()
        early = threading.Thread(target=go.wait)
        early.start()
        pin_to_cpus(frozenset({{{cpu}}}))
        late_seen = []
        late = threading.Thread(target=lambda: late_seen.append(sorted(os.sched_getaffinity(0))))
        late.start(); late.join()
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                               capture_output=True, text=True, check=True).stdout
        out = {{"main": sorted(os.sched_getaffinity(0)),
                "early": sorted(os.sched_getaffinity(early.native_id)),
                "late": late_seen[0], "child": json.loads(child)}}
        go.set(); early.join()
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=env, check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {
        "main": [cpu], "early": [cpu], "late": [cpu], "child": [cpu]}


def test_pinning_to_cpus_outside_the_allowed_set_raises() -> None:
    with pytest.raises(ValueError, match="not available"):
        pin_to_cpus(frozenset({max(os.sched_getaffinity(0)) + 1}))
    with pytest.raises(ValueError, match="not available"):
        pin_to_cpus(frozenset())
