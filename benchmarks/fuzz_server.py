"""Fuzz a real ``qc-robot serve`` with millions of malformed and valid messages while a valid
50 Hz driver runs; report whether it survived, what the valid driver saw, and what it cost.

Three kinds of processes, so that the fuzzer's own CPU use is not the driver's latency:

* the server: ``qc-robot serve`` with a random policy (so every chunk is checked for limits),
  ``log_dir`` and ``learner_bind`` set (the full recording path: episode journals, HDF5, the
  transition journal), stderr to a file (its size is reported);
* one valid driver (``--role driver``): the reference ``PolicyClient`` at 50 Hz, one observation
  per tick (a transition every 5 ticks), round trip per request; it checks every chunk (finite,
  within the welcome's limits) and counts missing replies;
* fuzzers (``--role fuzz``): every malformed kind: raw bytes, truncated and multi-frame messages,
  random msgpack trees, valid messages with mutated fields (wrong types, bin map keys, huge and
  negative ints, NaN/inf), lying ndarray headers, near-limit (64 MiB - 1 KiB) and over-limit
  sizes, plus valid hellos, observations, transitions, heartbeats, describes and byes; spread
  over many connections (a pool of sockets, one replaced every 2,000 messages).

The driver first runs alone (baseline), then with the fuzzers, in the same run. Printed and
written as markdown (``--out``): server alive, valid answered/sent, non-finite or out-of-limit
actions (must be 0), RSS before/after, server log growth, the valid driver's p50/p99.

    python benchmarks/fuzz_server.py --messages 1000000 --fuzzers 2 --out /tmp/fuzz.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qc_robot import protocol as P  # noqa: E402
from qc_robot.drivers.base import DriverSpec  # noqa: E402
from qc_robot.drivers.client import PolicyClient  # noqa: E402
from qc_robot.policies.base import ObsField  # noqa: E402

OBS, ACT, H, HZ = 37, 5, 5, 50.0
POLICY = f"random:{OBS}:{ACT}:{H}:{HZ:g}"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def driver_spec(obs_dim: int = OBS) -> DriverSpec:
    return DriverSpec([ObsField("state", (obs_dim,), "float32")], ACT, -np.ones(ACT), np.ones(ACT), HZ)


# -- the valid driver ----------------------------------------------------------------------------


def run_driver(address: str, out: str) -> None:
    """50 Hz until SIGTERM: one request per tick, then the JSON summary to ``out``."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = PolicyClient(address, driver_spec().hello("valid-50hz"))
    welcome = client.connect(30.0)
    lo, hi = welcome.action_low, welcome.action_high
    rng = np.random.default_rng(0)
    rtt: list[float] = []
    sent = answered = bad_actions = errors = missing = 0
    period, nxt, step, episode = 1.0 / HZ, time.monotonic(), 0, 0
    rows: list[np.ndarray] = []
    while not stop.is_set():
        o = rng.normal(0, 0.1, OBS).astype(np.float32)
        t0 = time.perf_counter()
        rid = client.request({"state": o}, episode, step)
        if rid is not None:
            sent += 1
            reply = client.poll(1.0)
            if isinstance(reply, P.Chunk):
                answered += 1
                rtt.append((time.perf_counter() - t0) * 1e3)
                a = reply.actions
                if not (np.all(np.isfinite(a)) and np.all(a >= lo) and np.all(a <= hi)):
                    bad_actions += 1
            elif isinstance(reply, P.Error):
                errors += 1
            else:
                missing += 1
                client.cancel(timed_out=True)
        rows.append(o)
        if len(rows) == 5:  # a valid transition every 5 ticks (exercises the recording path)
            k = np.stack(rows)
            client.send_transition(P.Transition(episode, step - 4, {"state": k}, np.zeros((5, ACT), np.float32),
                                                np.zeros(5, np.float32), np.zeros(5, bool),
                                                np.array([False] * 4 + [step % 500 == 499]), {"state": k}))
            rows = []
        step += 1
        if step % 500 == 0:
            episode, step = episode + 1, 0
        client.heartbeat()
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            nxt = time.monotonic()
    client.close()
    Path(out).write_text(json.dumps({"rtt": rtt, "sent": sent, "answered": answered, "bad_actions": bad_actions,
                                     "errors": errors, "missing": missing, "lost": client.stats.lost}))


# -- the fuzzer ----------------------------------------------------------------------------------


def _ext(dtype: str, shape: list[int], data: bytes) -> msgpack.ExtType:
    head = bytes([len(dtype)]) + dtype.encode() + bytes([len(shape)]) + struct.pack(f"<{len(shape)}I", *shape)
    return msgpack.ExtType(P.ARRAY_EXT, head + data)


class Pool:
    """Pre-generated messages of every kind (lists of frames), drawn at random when sending."""

    def __init__(self, seed: int, per_kind: int = 1500) -> None:
        self.r = random.Random(seed)
        self.kinds: dict[str, list[list[bytes]]] = {}
        valid = self._valid()
        raw_valid = [m[0] for m in valid]
        r = self.r
        self.kinds["valid"] = valid
        self.kinds["raw_bytes"] = [[r.randbytes(r.randint(0, 200))] for _ in range(per_kind)]
        self.kinds["truncated"] = [[(m := r.choice(raw_valid))[: r.randint(0, len(m) - 1)]] for _ in range(per_kind)]
        self.kinds["multi_frame"] = [self._split(r.choice(raw_valid)) for _ in range(per_kind)]
        self.kinds["msgpack_tree"] = [[msgpack.packb(self.tree(3), use_bin_type=True)] for _ in range(per_kind)]
        self.kinds["mutated"] = [[self.mutate(r.choice(raw_valid))] for _ in range(per_kind)]
        self.kinds["lying_array"] = [[self.lying()] for _ in range(per_kind)]
        self.kinds["non_finite"] = [[self.non_finite()] for _ in range(per_kind)]

    def _valid(self) -> list[list[bytes]]:
        o = np.zeros(OBS, np.float32)
        k = np.zeros((2, OBS), np.float32)
        msgs: list[P.Message] = [
            driver_spec().hello("fuzz"), driver_spec(OBS + 1).hello("fuzz-bad-spec"),
            P.Observation(1, 0, 0, 0.0, {"state": o}), P.Observation(2, 0, 1, 0.0, {"state": o}, True),
            P.Transition(0, 0, {"state": k}, np.zeros((2, ACT), np.float32), np.zeros(2, np.float32),
                         np.zeros(2, bool), np.array([False, True]), {"state": k}),
            P.Heartbeat(1, 0.0), P.Describe(5), P.Bye("fuzz"),
        ]
        return [[P.encode(m)] for m in msgs]

    def _split(self, data: bytes) -> list[bytes]:
        cuts = sorted(self.r.randint(0, len(data)) for _ in range(self.r.randint(1, 3)))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]

    def scalar(self) -> Any:
        r = self.r
        return r.choice([None, True, False, r.randint(-(2**63), 2**64 - 1), r.randint(-5, 5), float("nan"),
                         float("inf"), -float("inf"), r.random(), "x" * r.randint(0, 8), r.randbytes(4),
                         _ext("float32", [r.randint(0, 3)], r.randbytes(r.randint(0, 16)))])

    def tree(self, depth: int) -> Any:
        r = self.r
        if depth == 0 or r.random() < 0.4:
            return self.scalar()
        if r.random() < 0.5:
            return [self.tree(depth - 1) for _ in range(r.randint(0, 4))]
        keys = [r.choice(["v", "type", "obs", "state", b"state", 1, "request_id"]) for _ in range(r.randint(0, 4))]
        return {k: self.tree(depth - 1) for k in keys}

    def mutate(self, data: bytes) -> bytes:
        body = msgpack.unpackb(data, raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d))
        for _ in range(self.r.randint(1, 2)):
            key = self.r.choice([*body, "extra", "v", "type"])
            body[key] = self.tree(2)
        if "obs" in body and self.r.random() < 0.3:
            body["obs"] = {b"state": P.pack_array(np.zeros(OBS, np.float32)), "x": 1}
        return msgpack.packb(body, use_bin_type=True)

    def lying(self) -> bytes:
        r = self.r
        dtype = r.choice(["float32", "float64", "object", "V8", "float32\x00", "<f4", "bool"])
        shape = [r.choice([0, 1, OBS, 2**32 - 1, 2**31]) for _ in range(r.randint(0, 17))]
        arr = _ext(dtype, shape, r.randbytes(r.choice([0, 4, OBS * 4, 37])))
        return msgpack.packb({"v": 1, "type": "observation", "request_id": r.randint(0, 99), "episode_id": 0,
                              "step": 0, "timestamp": 0.0, "obs": {"state": arr}}, use_bin_type=True)

    def non_finite(self) -> bytes:
        r = self.r
        bad = r.choice([np.nan, np.inf, -np.inf])
        if r.random() < 0.5:
            o = np.zeros(OBS, np.float32)
            o[r.randrange(OBS)] = bad
            return P.encode(P.Observation(r.randint(0, 99), 0, 0, 0.0, {"state": o}))
        k = np.zeros((2, OBS), np.float32)
        a = np.zeros((2, ACT), np.float32)
        rew = np.zeros(2, np.float32)
        r.choice([a, rew, k]).flat[0] = bad
        return P.encode(P.Transition(0, r.randint(0, 9), {"state": k}, a, rew, np.zeros(2, bool), np.zeros(2, bool),
                                     {"state": k}))

    def draw(self) -> tuple[str, list[bytes]]:
        kind = self.r.choice(list(self.kinds))
        return kind, self.r.choice(self.kinds[kind])


def run_fuzz(address: str, count: int, seed: int, sockets: int, big_every: int, limit: int, out: str) -> None:
    ctx = zmq.Context()
    pool = Pool(seed)
    r = random.Random(seed + 1)

    def sock() -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 10_000)  # a replaced connection still delivers what it queued
        s.setsockopt(zmq.SNDHWM, 200)
        s.connect(address)
        return s

    socks = [sock() for _ in range(sockets)]
    near = bytes(limit - 1024 - 64)  # a valid heartbeat just under the server's advertised limit
    big_near = msgpack.packb({"v": 1, "type": "heartbeat", "seq": 1, "timestamp": 0.0, "pad": near})
    big_over = bytes(limit + 1024)
    sent: dict[str, int] = {}
    replies = chunks = bad_chunks = connections = sync_timeouts = 0
    hb = iter(range(10**9, 2 * 10**9))

    def handle(data: bytes) -> P.Message | None:
        nonlocal replies, chunks, bad_chunks
        replies += 1
        try:
            m = P.decode(data)
        except P.ProtocolError:
            return None
        if isinstance(m, P.Chunk):
            chunks += 1
            if not (np.all(np.isfinite(m.actions)) and np.all(np.abs(m.actions) <= 1.0)):
                bad_chunks += 1
        return m

    def sync(t: zmq.Socket) -> None:
        """Wait until the server has handled everything sent on ``t`` (a heartbeat's echo): a
        closed connection's unread messages are dropped by ZeroMQ, so they would not count."""
        nonlocal sync_timeouts
        seq = next(hb)
        t.send(P.encode(P.Heartbeat(seq, 0.0)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if t.poll(100):
                m = handle(t.recv())
                if isinstance(m, P.Heartbeat) and m.seq == seq:
                    return
        sync_timeouts += 1

    i = 0
    while i < count:
        s = socks[i % sockets]
        if big_every and i % big_every == big_every - 1:
            kind, frames = r.choice([("near_limit", [big_near]), ("over_limit", [big_over])])
        else:
            kind, frames = pool.draw()
        try:
            s.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # the server's queue for this connection is full: backpressure
            time.sleep(0.0002)
            continue
        sent[kind] = sent.get(kind, 0) + 1
        i += 1
        if i % 2000 == 0:  # many connections: replace one socket (a new peer identity)
            j = r.randrange(sockets)
            sync(socks[j])
            socks[j].close()
            socks[j] = sock()
            connections += 1
        if i % 256 == 0:  # read what came back: every chunk a fuzzer got must be checked too
            for t in socks:
                while True:
                    try:
                        handle(t.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
    for t in socks:
        sync(t)
        t.close()
    ctx.term()  # waits until every queued message was handed to the server
    Path(out).write_text(json.dumps({"sent": sent, "replies": replies, "chunks": chunks, "bad_chunks": bad_chunks,
                                     "connections": connections + sockets,
                                     "sync_timeouts": sync_timeouts}))


# -- orchestration -------------------------------------------------------------------------------


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="main", choices=["main", "driver", "fuzz"])
    ap.add_argument("--address", default="")
    ap.add_argument("--messages", type=int, default=1_000_000, help="fuzz messages in total")
    ap.add_argument("--fuzzers", type=int, default=2, help="fuzzer processes")
    ap.add_argument("--sockets", type=int, default=16, help="connections per fuzzer at a time")
    ap.add_argument("--big-every", type=int, default=50_000, help="one near/over-limit message every N")
    ap.add_argument("--baseline-s", type=float, default=15.0, help="valid driver alone first")
    ap.add_argument("--fuzz-nice", type=int, default=0, help="nice level of the fuzzer processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--limit", type=int, default=P.MAX_MESSAGE_BYTES)
    ap.add_argument("--out", default="", help="write the markdown here")
    args = ap.parse_args()
    if args.role == "driver":
        return run_driver(args.address, args.json)
    if args.role == "fuzz":
        return run_fuzz(args.address, args.count, args.seed, args.sockets, args.big_every, args.limit, args.json)

    tmp = Path(tempfile.mkdtemp(prefix="qc-fuzz-"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log_path = tmp / "serve.log"
    log_file = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "qc_robot.cli", "serve", f"policy={POLICY}", "bind='tcp://127.0.0.1:*'",
         f"log_dir={tmp / 'served'}", "learner_bind='tcp://127.0.0.1:*'", f"journal_dir={tmp / 'journal'}",
         "max_clients=64", "log_level=INFO"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    address = ""
    deadline = time.monotonic() + 60
    while not address and time.monotonic() < deadline:
        m = re.search(r"serving policy .* on (tcp://\S+)", log_path.read_text())
        address = m.group(1) if m else ""
        time.sleep(0.1)
    if not address:
        raise SystemExit("server did not start:\n" + log_path.read_text()[-2000:])
    me = [sys.executable, str(Path(__file__).resolve())]
    probe = PolicyClient(address, driver_spec().hello("probe"))
    limit = int(probe.describe(10.0).get("max_message_bytes", P.MAX_MESSAGE_BYTES))
    probe.close()

    def driver_phase(name: str) -> subprocess.Popen:
        return subprocess.Popen([*me, "--role", "driver", "--address", address, "--json", str(tmp / f"{name}.json")],
                                cwd=ROOT, env=env)

    def finish(proc: subprocess.Popen, name: str) -> dict[str, Any]:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        return json.loads((tmp / f"{name}.json").read_text())

    time.sleep(1.0)
    base = driver_phase("baseline")
    time.sleep(args.baseline_s)
    baseline = finish(base, "baseline")
    rss0, log0 = _status(server.pid, "VmRSS"), log_path.stat().st_size
    drv = driver_phase("fuzzed")
    time.sleep(2.0)
    t0 = time.monotonic()
    per = args.messages // args.fuzzers
    fuzzers = [subprocess.Popen(["nice", "-n", str(args.fuzz_nice), *me, "--role", "fuzz", "--address", address,
                                 "--count", str(per), "--seed", str(args.seed + i), "--sockets", str(args.sockets),
                                 "--big-every", str(args.big_every), "--limit", str(limit),
                                 "--json", str(tmp / f"fuzz{i}.json")],
                                cwd=ROOT, env=env) for i in range(args.fuzzers)]
    for f in fuzzers:
        f.wait()
    fuzz_s = time.monotonic() - t0
    time.sleep(2.0)
    fuzzed = finish(drv, "fuzzed")
    alive = server.poll() is None
    rss1, hwm = (_status(server.pid, "VmRSS"), _status(server.pid, "VmHWM")) if alive else (-1, -1)
    log1 = log_path.stat().st_size
    if alive:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    else:
        code = server.returncode
    reports = [json.loads((tmp / f"fuzz{i}.json").read_text()) for i in range(args.fuzzers)]
    sent: dict[str, int] = {}
    for rep in reports:
        for k, v in rep["sent"].items():
            sent[k] = sent.get(k, 0) + v
    total = sum(sent.values())
    stopped = re.findall(r"stopped: .*", log_path.read_text())
    m = re.search(r"stopped: (\d+) messages received", stopped[-1]) if stopped else None
    received = int(m.group(1)) if m else -1
    lines = [
        f"# Server fuzzing: `benchmarks/fuzz_server.py` ({time.strftime('%Y-%m-%d')})",
        "",
        f"Conditions: {platform.machine()}, {os.cpu_count()} CPU cores shared with other developers' jobs, Python "
        f"{platform.python_version()}, pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}, loopback TCP. "
        f"`qc-robot serve policy={POLICY}` with `log_dir` and `learner_bind` set; {args.fuzzers} fuzzer process(es) "
        f"(nice {args.fuzz_nice}) with {args.sockets} connections each, one replaced every 2,000 messages; one "
        f"near/over-limit message every {args.big_every:,} (the server's advertised limit: {limit:,} B); the valid "
        "driver is its own process.",
        "",
        "| result | value |",
        "|---|---|",
        f"| server alive after the fuzz | **{'yes' if alive else 'NO'}** (exit code on SIGTERM: {code}) |",
        f"| fuzz messages sent | {total:,} in {fuzz_s:.0f} s ({total / fuzz_s:,.0f}/s) over "
        f"{sum(r['connections'] for r in reports):,} connections |",
        f"| messages the server received and handled (all peers, whole run) | {received:,} "
        f"(a connection's heartbeat echo was awaited before closing it; {sum(r['sync_timeouts'] for r in reports)} "
        "waits timed out) |",
        f"| valid driver under fuzz: answered / sent | {fuzzed['answered']:,} / {fuzzed['sent']:,} "
        f"(errors {fuzzed['errors']}, no reply within 1 s {fuzzed['missing']}, sessions lost {fuzzed['lost']}) |",
        f"| non-finite or out-of-limit actions (valid driver + every chunk fuzzers got) | "
        f"**{fuzzed['bad_actions'] + baseline['bad_actions'] + sum(r['bad_chunks'] for r in reports)}** "
        f"(of {fuzzed['answered'] + baseline['answered'] + sum(r['chunks'] for r in reports):,} chunks) |",
        f"| valid driver round trip, alone (baseline, {baseline['answered']:,} requests) | p50 "
        f"{pct(baseline['rtt'], 50):.2f} ms, p99 {pct(baseline['rtt'], 99):.2f} ms, max {max(baseline['rtt']):.1f} ms |",
        f"| valid driver round trip, under fuzz | p50 **{pct(fuzzed['rtt'], 50):.2f} ms**, p99 "
        f"**{pct(fuzzed['rtt'], 99):.2f} ms**, max {max(fuzzed['rtt']):.1f} ms (one control period: 20 ms) |",
        f"| server RSS before / after the fuzz (peak) | {rss0 / 1024:.0f} MB / {rss1 / 1024:.0f} MB "
        f"({hwm / 1024:.0f} MB) |",
        f"| server log growth during the fuzz | {(log1 - log0) / 1e3:,.0f} kB |",
        "",
        "Messages by kind: " + ", ".join(f"{k} {v:,}" for k, v in sorted(sent.items())) + ".",
        "",
        f"Server's own summary: `{stopped[-1] if stopped else 'n/a'}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    log_file.close()


if __name__ == "__main__":
    main()
