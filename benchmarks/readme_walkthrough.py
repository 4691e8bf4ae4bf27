"""Walk through the README as a newcomer does: its shell blocks, run as written, in a checkout.

Runs the ```bash blocks of the named README sections (default: "First commands" and "The main
job"), each block as one bash script in the checkout's root with the checkout's venv first on
PATH, so a block's `&` and `kill $!` work as they do for a reader. Each command's exit code,
wall time and the lines a reader looks at (success counts, what was written, errors) are kept,
and a section is appended to docs/readme_walkthrough.md. Run it in a fresh clone whose venv was
made by the README's set-up (`.ci/run` makes one: the set-up's two commands):

    git clone <repo> /tmp/fresh && cd /tmp/fresh && CI=true bash .ci/run
    python benchmarks/readme_walkthrough.py --checkout /tmp/fresh --out <repo>/docs/readme_walkthrough.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "@@walkthrough"
SALIENT = re.compile(r"success \d+/\d+|solved|saved|wrote|written|exported|error|refus|Traceback|episode \d+/\d+: ",
                     re.IGNORECASE)


def blocks(readme: str, sections: list[str]) -> list[tuple[str, list[str]]]:
    """(section title, commands) of every ```bash block under a ``## `` heading that starts with
    one of ``sections``; backslash continuations joined, comments kept on the command."""
    out: list[tuple[str, list[str]]] = []
    title, fence = "", None
    for line in readme.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
        if line.strip().startswith("```"):
            if fence is None and line.strip() == "```bash" and any(title.startswith(s) for s in sections):
                fence = []
            elif fence is not None:
                cmds, cur = [], ""
                for ln in fence:
                    cur += ln.rstrip()
                    if cur.endswith("\\"):
                        cur = cur[:-1] + " "
                        continue
                    if cur.strip():
                        cmds.append(cur.strip())
                    cur = ""
                out.append((title, cmds))
                fence = None
            continue
        if fence is not None:
            fence.append(line)
    return out


def script(cmds: list[str]) -> str:
    """One bash script: each command followed by its exit code and time (between markers)."""
    lines = []
    for i, c in enumerate(cmds):
        lines.append(f"echo '{MARK} start {i}' $(date +%s.%N)")
        lines.append(c)
        lines.append(f"echo '{MARK} end {i}' $? $(date +%s.%N)")
    return "\n".join(lines) + "\n"


def run_block(cmds: list[str], checkout: Path, timeout_s: float) -> tuple[list[dict], str]:
    env = dict(os.environ)
    venv = checkout / ".venv" / "bin"
    env["PATH"] = f"{venv}:{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv.parent)
    env.pop("PYTHONPATH", None)
    path = checkout / ".walkthrough.sh"
    path.write_text(script(cmds))
    try:
        text = subprocess.run(["bash", str(path)], cwd=checkout, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout_s).stdout
    except subprocess.TimeoutExpired as e:
        got = e.stdout or b""
        text = (got.decode() if isinstance(got, bytes) else got) + f"\n(block stopped after {timeout_s:.0f} s)"
    finally:
        path.unlink(missing_ok=True)
    rows: list[dict] = []
    cur: dict | None = None
    for ln in text.splitlines():
        if ln.startswith(MARK):
            parts = ln.split()
            if parts[1] == "start":
                cur = {"cmd": cmds[int(parts[2])], "t0": float(parts[3]), "lines": []}
            elif cur is not None:
                cur["rc"], cur["wall"] = int(parts[3]), float(parts[4]) - cur["t0"]
                rows.append(cur)
                cur = None
        elif cur is not None and SALIENT.search(ln):
            cur["lines"].append(ln.strip())
    if cur is not None:
        cur["rc"], cur["wall"] = None, float("nan")
        rows.append(cur)
    return rows, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", default=str(REPO), help="the clone to run in (its .venv is used)")
    ap.add_argument("--sections", nargs="*", default=["First commands", "The main job"])
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per block")
    ap.add_argument("--out", default=str(REPO / "docs" / "readme_walkthrough.md"))
    ap.add_argument("--log", default="", help="file for every block's whole output (default: beside --out's runs/)")
    a = ap.parse_args()
    checkout = Path(a.checkout).resolve()
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    found = blocks((checkout / "README.md").read_text(), a.sections)
    if not found:
        print(f"no ```bash blocks under sections starting with {a.sections}", file=sys.stderr)
        return 2
    log = Path(a.log) if a.log else REPO / "runs" / "readme_walkthrough.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    report, failed = [], 0
    with log.open("w") as lf:
        for title, cmds in found:
            print(f"== {title}: {len(cmds)} commands", flush=True)
            t0 = time.monotonic()
            rows, text = run_block(cmds, checkout, a.timeout)
            lf.write(f"==== {title}\n{text}\n")
            for r in rows:
                ok = r["rc"] == 0
                failed += not ok
                print(f"  [{'ok' if ok else 'FAILED'} rc={r['rc']} {r['wall']:.0f} s] {r['cmd'][:100]}", flush=True)
            report.append((title, rows, time.monotonic() - t0, len(cmds)))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(a.out)
    new = not out.exists()
    with out.open("a") as f:
        if new:
            f.write("# The README, walked through\n\nWritten by `python benchmarks/readme_walkthrough.py` (each "
                    "run appends a section): the README's shell blocks run as written in a fresh clone whose "
                    "venv the README's set-up made, each command's exit code, wall time and the lines a "
                    "reader looks at.\n")
        f.write(f"\n## {stamp}: commit `{commit}`, {os.cpu_count()} cores\n")
        for title, rows, wall, n in report:
            f.write(f"\n### {title} ({len(rows)} of {n} commands ran, {wall:.0f} s)\n\n"
                    "| exit | wall (s) | command | what it printed (excerpt) |\n|---|---|---|---|\n")
            for r in rows:
                cmd = r["cmd"].split("  #")[0].strip().replace("|", "\\|")
                said = "<br>".join(ln.replace("|", "\\|")[:160] for ln in r["lines"][-3:])
                f.write(f"| {r['rc']} | {r['wall']:.0f} | `{cmd}` | {said} |\n")
    print(f"written to {out}; whole output in {log}; {failed} command(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
