"""Cold import and CLI start-up: diffloom next to diffusers, measured in fresh interpreters in one run.

    python benchmarks/import_time.py [--repeat 7]

Each row is the median wall time of fresh `python -c ...` processes, minus the bare interpreter's start-up.
Targets: `import diffloom` under 0.15 s without torch; `from diffloom import DiffusionPipeline` at most 40% of
`from diffusers import DiffusionPipeline`.
"""

import argparse
import statistics
import subprocess
import sys
import time

CASES = [
    ("import diffloom", "import diffloom, sys; assert 'torch' not in sys.modules"),
    ("import diffusers", "import diffusers"),
    ("from diffloom import DiffusionPipeline", "from diffloom import DiffusionPipeline"),
    ("from diffusers import DiffusionPipeline", "from diffusers import DiffusionPipeline"),
    ("diffloom plugins (in process)",
     "import io, contextlib, diffloom.cli as c\nwith contextlib.redirect_stdout(io.StringIO()): c.main(['plugins'])"),
]


def wall(code: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    wall("pass", 2)  # warm the file cache
    base = wall("pass", args.repeat)
    results = {label: wall(code, args.repeat) - base for label, code in CASES}
    print(f"{'case':<42} {'seconds':>8}")
    for label, seconds in results.items():
        print(f"{label:<42} {seconds:8.3f}")
    ratio = results["from diffloom import DiffusionPipeline"] / results["from diffusers import DiffusionPipeline"]
    print(f"\nDiffusionPipeline import, diffloom / diffusers: {ratio:.2f}x (target <= 0.40)")
    print(f"import diffloom: {results['import diffloom']:.3f} s (target < 0.15, torch not imported)")


if __name__ == "__main__":
    main()
