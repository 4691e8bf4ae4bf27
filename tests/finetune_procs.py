"""Processes that the learner-link tests kill with SIGKILL (run as scripts, never imported by code).

``python tests/finetune_procs.py learner ADDR DIR``: a stand-in learner that appends every record
it applies to DIR/applied.txt and checkpoints (DIR/ckpt.json: applied seq and line count) every 7
records, like ``qc-robot finetune`` does with its replay; restarted, it restores the checkpoint
(dropping lines applied after it) and subscribes from there.

``python tests/finetune_procs.py server DRIVER_PORT LEARNER_PORT JOURNAL_DIR``: a control server
(hold policy, OBS=4, ACT=2, H=3) with its learner port, until killed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def learner(addr: str, d: str) -> None:
    from qc_robot.finetune.client import LearnerClient

    ck, out = Path(d) / "ckpt.json", Path(d) / "applied.txt"
    state = json.loads(ck.read_text()) if ck.exists() else {"seq": 0, "lines": 0}
    lines = out.read_text().splitlines()[: state["lines"]] if out.exists() else []
    out.write_text("".join(line + "\n" for line in lines))  # restore: forget what the checkpoint lacks
    client = LearnerClient(addr, state["seq"] + 1, heartbeat_s=0.2, timeout_s=2.0).start()
    seq = state["seq"]
    with out.open("a") as f:
        while True:
            for r in client.get(0.1):
                if r.seq != seq + 1:
                    f.write(f"ORDER {r.seq} after {seq}\n")
                seq = r.seq
                lines.append(f"{r.seq} {r.transition.start_step}")
                f.write(lines[-1] + "\n")
                f.flush()
                if seq % 7 == 0:
                    tmp = ck.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"seq": seq, "lines": len(lines)}))
                    os.replace(tmp, ck)
                    client.persisted(seq)


def server(driver_port: str, learner_port: str, journal_dir: str) -> None:
    from qc_robot.server.app import ControlServer
    from qc_robot.server.journal import Journal
    from qc_robot.server.learner_link import LearnerLink
    from qc_robot.server.serve import load_policy

    link = LearnerLink(f"tcp://127.0.0.1:{learner_port}", Journal(journal_dir), heartbeat_s=0.2, timeout_s=3.0,
                       resend_s=1.0)
    ControlServer(load_policy("hold:4:2:3"), f"tcp://127.0.0.1:{driver_port}", learner_link=link).start()
    print("ready", flush=True)
    while True:
        time.sleep(1.0)


if __name__ == "__main__":
    {"learner": learner, "server": server}[sys.argv[1]](*sys.argv[2:])
