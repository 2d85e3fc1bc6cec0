"""`make bench` / `python -m bench`: run benchmarks 1-4 and 6-8 on this machine and (re)write their
sections of BENCHMARKS.md. Benchmark 5 (`python -m bench.gpu_train`) needs a CUDA GPU and
runs on its own; section 8, the fault soak (`make soak`, `python -m bench.soak`), runs on its
own too (minutes of load, kills and network faults; it fails on a violated invariant).

    python -m bench                      # 1-4 and 6-8, about 13 minutes on 2 cores
    python -m bench --only 1,3           # some of them; the other sections of BENCHMARKS.md stay
    python -m bench --delay-ms 20        # benchmark 1 with another per-request delay

Every figure is a ratio against a baseline measured in the same run. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine, today

BENCHMARKS = ROOT / "BENCHMARKS.md"

HEADER = """# Benchmarks

Measured by `make bench` (`python -m bench`); benchmark 5 by `python -m bench.gpu_train` on a
CUDA machine; section 8, the fault soak, by `make soak`. Every figure of 1-7 is a ratio against
a baseline run in the same process or the same run; nothing here is a timed assertion in the
test suite. Each section says the machine, the date and the command that reproduces it, and
whether each target of the issue is met (and why not, where it is not).
"""

GPU_NOT_RUN = """## 5. GPU training throughput (Llama-3.2-1B architecture)

**Not run yet**: no CUDA machine was available. `python -m bench.gpu_train` runs it in one
command on a CUDA GPU (random weights on the Llama-3.2-1B architecture from
`bench/configs/llama-3.2-1b.json`, qlora and lora, packed chat data at sequence length 2048,
against a plain PEFT + `transformers.Trainer` baseline in the same run) and writes this
section. On a machine without CUDA it says so and exits 0.
"""


def _section_pattern(n: int) -> re.Pattern[str]:
    return re.compile(rf"<!-- bench:{n} -->.*?<!-- /bench:{n} -->", re.S)


def write_section(n: int, text: str, path: Path = BENCHMARKS) -> None:
    """Replace section `n` of BENCHMARKS.md (between its markers), keeping the others."""
    block = f"<!-- bench:{n} -->\n{text.rstrip()}\n<!-- /bench:{n} -->"
    current = path.read_text() if path.exists() else HEADER
    if _section_pattern(n).search(current):
        current = _section_pattern(n).sub(lambda _: block, current)
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    # Keep the sections in order.
    blocks = {
        int(m.group(1)): m.group(0) for m in re.finditer(r"<!-- bench:(\d+) -->.*?<!-- /bench:\1 -->", current, re.S)
    }
    head = re.split(r"<!-- bench:\d+ -->", current, maxsplit=1)[0].rstrip()
    path.write_text(head + "\n\n" + "\n\n".join(blocks[k] for k in sorted(blocks)) + "\n")


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"{one:.1f} / {five:.1f}"
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="1,2,3,4,6,7,8", help="comma-separated benchmark numbers (default 1-4, 6-8)")
    p.add_argument("--delay-ms", type=float, default=10.0, help="benchmark 1: delay per S3 request (default 10)")
    p.add_argument("--sizes", default="100,1000,10000", help="benchmark 1: document counts (default 100,1000,10000)")
    p.add_argument("--output", type=Path, default=BENCHMARKS)
    args = p.parse_args(argv)
    wanted = [int(x) for x in args.only.split(",") if x.strip()]
    cmd = (
        "make bench"
        if wanted == [1, 2, 3, 4, 6, 7, 8] and args.delay_ms == 10
        else "python -m bench " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    )

    from bench import cold_start, job_overhead, listing, long_dialogs, preference, rag, throughput

    sizes = tuple(int(x) for x in args.sizes.split(","))
    runs: dict[int, tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any], str], str]]] = {
        1: (lambda: listing.run(sizes=sizes, delay_ms=args.delay_ms, log=_log), listing.markdown),
        2: (lambda: cold_start.run(log=_log), cold_start.markdown),
        3: (lambda: throughput.run(log=_log), throughput.markdown),
        4: (lambda: job_overhead.run(log=_log), job_overhead.markdown),
        6: (lambda: rag.run(log=_log), rag.markdown),
        7: (lambda: long_dialogs.run(log=_log), long_dialogs.markdown),
        8: (lambda: preference.run(log=_log), preference.markdown),
    }
    if not args.output.exists():
        args.output.write_text(HEADER)
    if not _section_pattern(5).search(args.output.read_text()):
        write_section(5, GPU_NOT_RUN, args.output)
    started = time.monotonic()
    _log(f"bench on {machine()} ({today()}); load average {_load()}")
    for n in wanted:
        t0 = time.monotonic()
        load_before = _load()
        _log(f"benchmark {n} ...")
        result = runs[n][0]()
        text = runs[n][1](result, cmd)
        text += f"\nRun took {time.monotonic() - t0:.0f} s; load average (1 / 5 min) before it: {load_before}.\n"
        write_section(n, text, args.output)
        _log(f"benchmark {n} done in {time.monotonic() - t0:.0f} s")
    _log(f"all done in {time.monotonic() - started:.0f} s; wrote {args.output}")


def _log(msg: str) -> None:
    print(msg, flush=True)


if __name__ == "__main__":
    main()
