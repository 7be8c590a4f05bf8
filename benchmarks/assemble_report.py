"""docs/performance.md from two full runs of the suite and the hand-written notes.

    python3 benchmarks/run_all.py --out /tmp/a.md && python3 benchmarks/run_all.py --out /tmp/b.md
    python3 benchmarks/assemble_report.py /tmp/a.md /tmp/b.md && cp /tmp/a.json docs/performance.json

The document is run A as `run_all.py` wrote it, with run B's ratios in a second column of the target
table (one run's ratios move by 10-15% on a shared machine: two side by side show it). Each note of
``docs/performance-notes/*.md`` (in name order) goes right after the section whose ``### `` title is
its first line; a note without such a title goes before the target table. The notes are
hand-written and cite the runs they were written for: rewrite their figures when the runs change.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ROOT = Path(__file__).resolve().parents[1]


def _targets(text: str) -> dict[str, list[str]]:
    if "| case | measured" not in text:
        return {}
    t = text[text.index("| case | measured"):]
    t = t[:t.index("\n\n")] if "\n\n" in t else t
    return {c[0]: c for c in ([x.strip() for x in r.strip("|").split(" | ")] for r in t.split("\n")[2:] if r)}


def assemble(run_a: str, run_b: str, notes: list[str]) -> str:
    """The document (see the module doc) from the two runs' Markdown and the notes' texts."""
    from sparselearn.experiments.bench_util import _load_note

    rb, out, lines, i = _targets(run_b), [], run_a.split("\n"), 0
    threads = re.search(r"(\d+) thread\(s\) per process", run_a)
    while i < len(lines):
        ln = lines[i]
        m = re.match(r"(- load average \(1/5/15 min\) at start ([0-9.]+) / [0-9.]+ / [0-9.]+, at end ([0-9.]+) / "
                     r"[0-9.]+ / [0-9.]+): .*", ln)
        if m:  # worded by the current rule (an older generator judged by the start as well)
            ln = f"{m.group(1)}: {_load_note(float(m.group(2)), float(m.group(3)), threads and int(threads.group(1)))}"
        if ln.startswith("| case | measured"):
            out += ["| case | run A | run B | target | A / B |", "|---|---:|---:|---:|---|"]
            i += 2
            while i < len(lines) and lines[i].startswith("| "):
                case, va, target, sa = [c.strip() for c in lines[i].strip("|").split(" | ")][:4]
                vb, sb = (rb[case][1], rb[case][3]) if case in rb else ("-", sa)
                out.append(f"| {case} | {va} | {vb} | {target} | {sa if sa == sb else f'{sa} / {sb}'} |")
                i += 1
            continue
        out.append(ln)
        i += 1
    doc = "\n".join(out).rstrip("\n") + "\n"
    for text in notes:
        text = text.strip()
        title, _, body = text.partition("\n")
        if title.startswith("### ") and title in doc:
            s = doc.index(title)
            nxt = re.search(r"^#{2,3} ", doc[s + len(title):], flags=re.M)
            e = s + len(title) + nxt.start() if nxt else len(doc)
            doc = doc[:e].rstrip("\n") + "\n\n" + body.strip() + "\n\n" + doc[e:]
        elif title.startswith("### "):  # a section of its own (end-to-end runs), at the end
            doc = doc.rstrip("\n") + "\n\n" + text + "\n"
        else:
            at = doc.index("## Targets of issue 10") if "## Targets of issue 10" in doc else doc.index("## Measurements")
            doc = doc[:at] + text + "\n\n" + doc[at:]
    return doc.rstrip("\n") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", help="Markdown report of the run the document shows")
    ap.add_argument("run_b", help="Markdown report of the second run (its target ratios)")
    ap.add_argument("--notes", default=str(ROOT / "docs" / "performance-notes"), help="folder of the hand-written notes")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    args = ap.parse_args(argv)
    notes = [p.read_text() for p in sorted(Path(args.notes).glob("*.md"))]
    Path(args.out).write_text(assemble(Path(args.run_a).read_text(), Path(args.run_b).read_text(), notes))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
