"""Turn benchmarks/results/<device>.json into a Markdown table: python benchmarks/report.py [file ...]"""

import glob
import json
import os
import sys


def table(path: str) -> str:
    data = json.load(open(path))
    lines = [f"### {data['device']} (torch {data['torch']}, {data.get('threads', '?')} threads)", "",
             "| case | provider | median ms | vs hf | vs reference | saved MiB | saved vs hf |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(data["rows"], key=lambda r: (r["case"], r["provider"])):
        saved = f"{r['saved_bytes'] / 2**20:.1f}" if r.get("saved_bytes") else ""
        lines.append(
            f"| {r['case']} | {r['provider']} | {r['median_s'] * 1e3:.2f} | "
            f"{r.get('speedup_vs_hf', float('nan')):.2f}x | {r.get('speedup_vs_reference', float('nan')):.2f}x | "
            f"{saved} | {r.get('saved_vs_hf', float('nan')):.2f}x |".replace("nanx", "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    paths = sys.argv[1:] or sorted(glob.glob(os.path.join(os.path.dirname(__file__), "results", "*.json")))
    print("\n\n".join(table(p) for p in paths))
