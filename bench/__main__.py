"""The benchmark suite: every op, and the whole GPT-1 training step, against what users would pick instead.

    python -m bench [--quick] [--only layer_norm,attention] [--device cuda] [--out DIR]
    fastgpt bench ...                      (the same, wherever fastgpt is installed)

Runs each op's benchmark (bench/bench_<op>.py) in one process, so the device's ceilings (matrix-product rate, copy
bandwidth) are measured once and shared; each writes bench/results/<device>/<op>.json and .csv (a --quick run:
.cache/bench-quick/<device>/). Then draws the plots (bench/plots.py) and prints where the results are.
`python -m bench.readme_table --write` renders the README's performance table from the recorded results.
"""

from __future__ import annotations

import argparse
import importlib

import torch

from .common import device_flag, device_slug, environment, results_root

SUITE = ("layer_norm", "attention", "linear_gelu", "model", "seq2seq", "overhead")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastgpt bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few small shapes")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(SUITE)}")
    parser.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="results folder (default bench/results; with --quick, "
                                                    ".cache/bench-quick)")
    args = parser.parse_args(argv)

    names = SUITE if args.only is None else tuple(args.only.split(","))
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}: expected some of {', '.join(SUITE)}")
    forwarded = ["--device", args.device] + (["--quick"] if args.quick else []) + \
        (["--out", args.out] if args.out else [])
    ran, missing = [], []
    for name in names:
        try:
            module = importlib.import_module(f"{__package__}.bench_{name}")
        except ModuleNotFoundError as error:
            missing.append(f"{name} ({error})")
            continue
        print(f"\n=== {name} ===")
        module.main(forwarded)
        ran.append(name)
    folder = results_root(args) / device_slug(environment(torch.device(args.device)))
    from .plots import draw_all
    for path in draw_all(folder):
        print(f"plot: {path}")
    print(f"\nran: {', '.join(ran) or 'nothing'}" + (f"; not available: {'; '.join(missing)}" if missing else ""))
    print(f"results: {folder}")


if __name__ == "__main__":
    main()
