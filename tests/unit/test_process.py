"""`vlm.process`: `--cpus` (the CPU list syntax, pinning a whole process: threads before and
after, children) and `--malloc-mmap-threshold` (large buffers reused, not faulted in anew)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from preprocessor_svc.main import build_parser
from vlm.process import parse_cpu_list, pin_to_cpus


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
        from vlm.process import pin_to_cpus

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


_MALLOC_PROBE = textwrap.dedent("""
    import json, os, resource, subprocess, sys
    from vlm.process import tune_malloc

    applied = tune_malloc(int(sys.argv[1]))

    def faults_per_buffer():
        # What a request does to its payload: build an 8 MiB buffer, copy it on, drop both.
        src = os.urandom(8 << 20)
        before = 0
        for i in range(22):
            if i == 2:  # the heap has grown to the working set
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            out = bytes(bytearray(src))
            del out
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20

    child = subprocess.run([sys.executable, "-c", "import os, json; print(json.dumps("
                            "[os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TRIM_THRESHOLD_')]))"],
                           capture_output=True, text=True, check=True).stdout
    print(json.dumps({"applied": applied, "faults": faults_per_buffer(), "child_env": json.loads(child)}))
""")


def _malloc_probe(threshold: int, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    base["PYTHONPATH"] = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, str(threshold)], capture_output=True,
                         text=True, timeout=120, env={**base, **env}, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_reuses_large_buffers_and_children_inherit_it() -> None:
    tuned = _malloc_probe(64 << 20)
    assert tuned["applied"] is True
    assert tuned["child_env"] == [str(64 << 20), str(128 << 20)]
    default = _malloc_probe(0)  # 0: glibc's defaults
    assert default["applied"] is False and default["child_env"] == [None, None]
    # 8 MiB is 2048 pages. With glibc's defaults each buffer is mapped afresh and faulted in
    # page by page; tuned, freed buffers are reused from the heap.
    assert default["faults"] > 1000
    assert tuned["faults"] < default["faults"] / 10


def test_the_operators_malloc_environment_wins() -> None:
    out = _malloc_probe(64 << 20, MALLOC_MMAP_THRESHOLD_="131072")
    assert out["applied"] is False
    assert out["child_env"] == ["131072", None]


def test_both_services_take_the_malloc_flag() -> None:
    assert build_parser().parse_args(["--model", "m"]).malloc_mmap_threshold == 64 << 20
    assert build_parser().parse_args(["--model", "m", "--malloc-mmap-threshold", "0"]).malloc_mmap_threshold == 0
