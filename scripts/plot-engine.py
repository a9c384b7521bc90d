#!/usr/bin/env python3
"""Grouped bar chart (SVG, standard library only) of the engine against its
peers, from the lines `crates/seen-bench-compare/examples/churn.rs` prints:

    <structure> <grow|presized|steady> <rate> M events/s (...)

Each bar is the median of that structure's runs in that mode; the runs
themselves are drawn as dots. Usage:

    for i in 1 2 3; do for mode in grow presized steady; do for s in seen seen-batch dashmap-u64 scc-u64; do
        target/release/examples/churn $s 10000000 20000000 $mode
    done; done; done > runs.txt
    python3 scripts/plot-engine.py runs.txt > docs/engine-throughput.svg
"""

import re
import statistics
import sys

LINE = re.compile(r"^(\S+) (grow|presized|steady) ([0-9.]+) M events/s")
COLOURS = {
    "seen": "#1f77b4",
    "seen-batch": "#0b3d66",
    "dashmap-u64": "#ff7f0e",
    "scc-u64": "#2ca02c",
}
LABELS = {
    "grow": "growing from empty (15M ids)",
    "presized": "same, pre-sized: no growth",
    "steady": "steady: ~10M resident, TTL churn",
}


def main() -> None:
    runs: dict[tuple[str, str], list[float]] = {}
    source = open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin
    for line in source:
        m = LINE.match(line.strip())
        if m:
            runs.setdefault((m[2], m[1]), []).append(float(m[3]))
    if not runs:
        sys.exit("no result lines found")
    modes = [m for m in ("grow", "presized", "steady") if any(k[0] == m for k in runs)]
    structures = [s for s in COLOURS if any(k[1] == s for k in runs)]
    # Only the structures drawn set the scale (not `harness` or `seen-hash`).
    top = max(v for (_, st), vs in runs.items() if st in COLOURS for v in vs) * 1.15

    width, height = 860, 420
    left, right, top_pad, bottom = 60, 20, 50, 90
    plot_h = height - top_pad - bottom
    group_w = (width - left - right) / len(modes)
    bar_w = group_w * 0.8 / len(structures)

    def y(v: float) -> float:
        return top_pad + plot_h * (1 - v / top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15">'
        "Decisions per second, 2 threads, UUID-like ids, 25 % duplicates (medians; dots: runs)</text>",
    ]
    step = 1.0 if top < 12 else 2.0
    tick = 0.0
    while tick <= top:
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>'
        )
        tick += step
    out.append(
        f'<text x="16" y="{top_pad + plot_h / 2}" transform="rotate(-90 16 {top_pad + plot_h / 2})" '
        'text-anchor="middle">M events/s</text>'
    )
    for gi, mode in enumerate(modes):
        x0 = left + gi * group_w + group_w * 0.1
        for si, s in enumerate(structures):
            vs = runs.get((mode, s))
            if not vs:
                continue
            med = statistics.median(vs)
            x = x0 + si * bar_w
            out.append(
                f'<rect x="{x:.1f}" y="{y(med):.1f}" width="{bar_w * 0.9:.1f}" '
                f'height="{y(0) - y(med):.1f}" fill="{COLOURS[s]}"/>'
            )
            out.append(
                f'<text x="{x + bar_w * 0.45:.1f}" y="{y(med) - 5:.1f}" text-anchor="middle">{med:.2f}</text>'
            )
            for v in vs:
                out.append(
                    f'<circle cx="{x + bar_w * 0.45:.1f}" cy="{y(v):.1f}" r="2.5" fill="black" fill-opacity="0.5"/>'
                )
        out.append(
            f'<text x="{left + gi * group_w + group_w / 2:.1f}" y="{y(0) + 18:.1f}" '
            f'text-anchor="middle">{LABELS[mode]}</text>'
        )
    lx = left
    for s in structures:
        out.append(
            f'<rect x="{lx}" y="{height - 30}" width="12" height="12" fill="{COLOURS[s]}"/>'
        )
        out.append(f'<text x="{lx + 16}" y="{height - 20}">{s}</text>')
        lx += 150
    out.append("</svg>")
    print("\n".join(out))


if __name__ == "__main__":
    main()
