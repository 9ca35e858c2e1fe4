"""`make bench`: run every benchmark in turn; each writes its own section of docs/benchmarks.md.

python -m bench                 # all
python -m bench placement eviction
"""

from __future__ import annotations

import runpy
import sys
import time

ALL = [
    "dispatch", "served_throughput", "adaptive_batching", "overload", "eviction", "kv_cache",
    "generation", "placement", "vs_mlserver", "peers", "vs_llamacpp", "fleet_e2e", "rollout_fleet",
    "canary_judge",
]  # fmt: skip


def main(names: list[str]) -> int:
    for name in names or ALL:
        if name not in ALL:
            print(f"unknown benchmark {name!r}; one of: {', '.join(ALL)}", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        print(f"== bench.{name}", flush=True)
        runpy.run_module(f"bench.{name}", run_name="__main__")
        print(f"== bench.{name} done in {time.monotonic() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
