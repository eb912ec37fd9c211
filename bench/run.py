"""`vlm bench`: run the benchmarks and write JSON + markdown results.

    vlm bench [preprocess|model|digest|soak|memory|all] [--quick] [--out DIR]

* `preprocess`: preprocessing throughput of the preprocessor service vs. the HF processor
  in-process (`bench.preprocess_throughput`);
* `model`: the gRPC pair vs. an in-process vLLM AsyncLLM (`bench.model_latency`);
* `digest`: the cost per MiB of the verified item digest (`bench.digest`);
* `soak`: 64 concurrent streaming clients for 60 s against the pair as processes (`bench.soak`);
* `memory`: the preprocessor's peak memory under concurrent maximum-size messages (`bench.memory`);
* `all` (default): all of them, one after the other.

Each benchmark prints its markdown table and writes `<name>.json` and `<name>.md` to the output
folder (default `bench/results/`). `--quick` uses smoke-test settings (the figures are then
only a sign of life). See bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import DEFAULT_OUT, log, write_results

SUITES = ("preprocess", "model", "digest", "soak", "memory")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlm bench", description="Run the benchmarks (JSON + markdown output).")
    p.add_argument("which", nargs="?", choices=(*SUITES, "all"), default="all",
                   help="which benchmark to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test settings: short runs, figures not meaningful")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output folder for <name>.json / <name>.md (default: bench/results/)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    chosen = SUITES if args.which == "all" else (args.which,)
    t0 = time.perf_counter()
    sections: list[str] = []
    failed: list[str] = []
    for suite in chosen:
        # Imported here: each module pulls in its own heavy dependencies only when run.
        if suite == "preprocess":
            from bench import preprocess_throughput as mod
        elif suite == "digest":
            from bench import digest as mod
        elif suite == "soak":
            from bench import soak as mod
        elif suite == "memory":
            from bench import memory as mod
        else:
            from bench import model_latency as mod
        t = time.perf_counter()
        try:
            mod.run(quick=args.quick, out_dir=args.out)
        except Exception as e:  # noqa: BLE001 - report and go on with the next benchmark
            log(f"{suite}: FAILED: {type(e).__name__}: {e}")
            failed.append(suite)
            continue
        sections.append((args.out / f"{mod.NAME}.md").read_text())
        log(f"{suite}: {time.perf_counter() - t:.0f}s")
    if len(chosen) > 1 and sections:
        summary = "\n".join(sections)
        write_results(
            args.out, "summary",
            {"benchmarks": list(chosen), "failed": failed, "quick": args.quick,
             "total_s": time.perf_counter() - t0},
            summary,
        )
    log(f"all done in {time.perf_counter() - t0:.0f}s; results in {args.out}"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
