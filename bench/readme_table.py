"""Renders the README's performance table from the recorded results, so the README carries no number that no
result file backs.

    python -m bench.readme_table            # print the table
    python -m bench.readme_table --write    # replace the block between the markers in README.md

One section per device folder under bench/results/, one line per (op, shape, dtype, pass) for fastgpt's fastest
backend and the strongest competitor of the same run (fastest; for a memory measurement, the least peak
memory). Rows of a non-default setting, timed only to compare with the default, are left out (NOT_DEFAULT).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import RESULTS, cost

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"
# fastgpt rows that time a setting users only get by asking for it (the CUDA attention kernels with mma.sync on a
# Hopper GPU, FASTGPT_CUDA_WGMMA=off): the table reports what fastgpt does by default.
NOT_DEFAULT = ("fastgpt-csrc-mma-sync",)


def _versions(envs: list[dict]) -> str:
    """The software and dates of a device's result files: each value once, as the files may come from several runs."""
    def values(key: str, default: str = "-") -> str:
        return " / ".join(dict.fromkeys(str(env.get(key) or default) for env in envs))
    dates = sorted(env["date"][:10] for env in envs)
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    return f"torch {values('torch')}, triton {values('triton')}, CUDA {values('cuda')}, {when}"


def render(results: Path = RESULTS) -> str:
    sections = []
    for folder in sorted(p for p in results.iterdir() if p.is_dir()) if results.exists() else []:
        lines = []
        envs = []
        for path in sorted(folder.glob("*.json")):
            data = json.loads(path.read_text())
            if "environment" not in data:
                continue  # a training run's record kept beside the benchmarks (finetune.json, translation.json)
            envs.append(data["environment"])
            groups: dict[tuple, list[dict]] = {}
            for row in data["rows"]:
                groups.setdefault((row["op"], row["shape"], row["dtype"], row["pass_"]), []).append(row)
            for (op, shape, dtype, pass_), rows in groups.items():
                ours = [r for r in rows if r["impl"].startswith("fastgpt") and r["impl"] not in NOT_DEFAULT]
                peers = [r for r in rows if not r["impl"].startswith("fastgpt")]
                if not ours or not peers:
                    continue
                best, peer = min(ours, key=cost), min(peers, key=cost)
                source = f"`{path.relative_to(results.parent.parent)}`"
                if "partial" in data["environment"]:  # a run stopped part-way (common.run_grid)
                    source += f" (partial: {data['environment']['partial']})"
                if best["unit"] == "MiB":  # a memory measurement: peak MiB, and how many times less than the peer
                    less = cost(peer) / max(cost(best), 1e-3)
                    lines.append(f"| {op} | {shape} | {dtype} | {pass_} | {best['impl']} {best['metric']:.1f} MiB peak "
                                 f"| {peer['impl']} {peer['metric']:.1f} MiB | {less:.2f}x less | {source} |")
                    continue
                lines.append(f"| {op} | {shape} | {dtype} | {pass_} | {best['impl']} {best['median_ms']:.3f} ms, "
                             f"{best['metric']:.1f} {best['unit']} | {peer['impl']} {peer['median_ms']:.3f} ms | "
                             f"{peer['median_ms'] / best['median_ms']:.2f}x | {source} |")
        if lines:
            sections.append(f"**{envs[0]['device']}** ({_versions(envs)})\n\n"
                            "| op | shape | dtype | pass | fastgpt (best backend) | best peer | speed-up | source |\n"
                            "|---|---|---|---|---|---|---|---|\n" + "\n".join(lines))
    return "\n\n".join(sections) or "No results recorded yet."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"rewrite the block between {START} and {END}")
    args = parser.parse_args(argv)
    table = render()
    if not args.write:
        print(table)
        return
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    print(f"README.md table rewritten from {RESULTS}")


if __name__ == "__main__":
    main()
