"""Channel throughput and per-message latency on loopback: our Connection vs a plain socket.

Two measurements per message size N, with the same pattern for ours and the plain socket:

* **throughput (stream)**: the client sends M messages of N bytes back to back (M such that a
  round moves >= 32 MB, at least 4, at most 256); the server receives every message into memory
  and answers the last one with a tiny ack.  Throughput = M x N / time until the ack.
* **latency (ping-pong)**: one message, then wait for the server's tiny ack (request/reply, what a
  training step does); seconds per round trip.

* ours: ``conn.send(K, {"x": float32 tensor of N bytes}, flags=...)`` (``conn.request`` for the
  ack'ed last one); the server's handler replies with an empty frame when flag bit 0 is set.  Both
  sides use the default ``Limits()`` (server ``idle_timeout=300``).  Plain TCP with the payload
  CRC32C (the default) and without; TLS (no CRC, the default).
* plain: a TCP_NODELAY socket (or ``ssl`` socket), a 9-byte prefix (length, ack wanted) then
  ``sendall`` of the tensor's memoryview; the server ``recv_into`` a **freshly allocated**
  ``torch.empty(n, uint8)`` per message (as ours must: a received tensor belongs to the caller)
  and sends 1 byte back when asked.
* plain, reused buffer (extra column, for transparency): the same, but the server receives into
  one reused preallocated buffer (no per-message allocation / page faults).

The servers run in a child process (no GIL sharing with the client).  Every cell is the median
over interleaved rounds (ours and plain alternate, order flipped each round).

    python bench/channel.py            # full
    python bench/channel.py --quick    # fewer rounds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sft_kernels.channel import KIND_USER_MIN, Limits, Listener, TLSConfig, connect  # noqa: E402

TOKENS = {"bench": b"bench-secret"}
SIZES = [1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
K = KIND_USER_MIN
LIMITS = Limits()  # the defaults users get (1 GiB frames, idle_timeout=300 s on the server)
PREFIX = struct.Struct("<QB")  # plain baseline: message length, ack wanted
STREAM_BYTES = 32 << 20


# ------------------------------------------------------------------ server side (child process)

def _raw_serve(sock: socket.socket, reuse: bool) -> None:
    """Read length-prefixed messages; into one reused buffer, or a new tensor per message."""
    buf = bytearray(1 << 20)
    hdr = bytearray(PREFIX.size)
    try:
        while True:
            got = 0
            while got < PREFIX.size:
                k = sock.recv_into(memoryview(hdr)[got:])
                if k == 0:
                    return
                got += k
            n, want_ack = PREFIX.unpack(hdr)
            if reuse:
                if n > len(buf):
                    buf = bytearray(n)
                mv = memoryview(buf)[:n]
            else:
                msg = torch.empty(n, dtype=torch.uint8)  # handed to the caller, like a received tensor
                mv = memoryview(msg.numpy())
            got = 0
            while got < n:
                got += sock.recv_into(mv[got:])
            if want_ack:
                sock.sendall(b"k")
    except OSError:
        return
    finally:
        sock.close()


def _raw_listener(ctx: ssl.SSLContext | None, reuse: bool) -> int:
    ls = socket.create_server(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            s, _ = ls.accept()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ctx is not None:
                s = ctx.wrap_socket(s, server_side=True)
            threading.Thread(target=_raw_serve, args=(s, reuse), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return ls.getsockname()[1]


def _ack(conn) -> None:
    while True:
        f = conn.recv()
        if f.flags & 1:
            conn.send(f.kind, seq=f.seq)


def serve(cert_dir: str) -> None:
    tls = TLSConfig(cert=f"{cert_dir}/server.pem", key=f"{cert_dir}/server.key")
    ours = Listener(TOKENS, limits=LIMITS).start(_ack)
    ours_tls = Listener(TOKENS, limits=LIMITS, tls=tls).start(_ack)
    ports = {"ours": ours.address[1], "ours_tls": ours_tls.address[1],
             "plain": _raw_listener(None, False), "plain_tls": _raw_listener(tls.server_context(), False),
             "reuse": _raw_listener(None, True), "reuse_tls": _raw_listener(tls.server_context(), True)}
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    os._exit(0)  # skip interpreter teardown under the blocked daemon threads


# ------------------------------------------------------------------ client side

def make_certs(d: str) -> None:
    def run(*a: str) -> None:
        subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=bench-ca")
    Path(d, "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "ext")


class Plain:
    """The baseline client: length prefix + sendall of the tensor bytes, then wait for 1 ack byte."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(s, server_hostname="127.0.0.1") if ctx is not None else s
        self.ack = bytearray(1)

    def send(self, t: torch.Tensor, want_ack: bool) -> None:
        """Send one message (prefix, then the tensor memory); wait for the ack if ``want_ack``."""
        mv = memoryview(t.view(torch.uint8).numpy())
        self.sock.sendall(PREFIX.pack(len(mv), want_ack))
        self.sock.sendall(mv)
        if want_ack and self.sock.recv_into(self.ack) != 1:
            raise ConnectionError("server closed")

    def request(self, t: torch.Tensor) -> None:
        """One message and its ack (ping-pong)."""
        self.send(t, True)

    def stream(self, t: torch.Tensor, m: int) -> None:
        """``m`` messages back to back; only the last one is ack'ed."""
        for i in range(m):
            self.send(t, i == m - 1)


def ours_stream(conn, t: torch.Tensor, m: int) -> None:
    """``m`` frames back to back on our connection; the last one is a request (flag bit 0 = ack me)."""
    x = {"x": t}
    for _ in range(m - 1):
        conn.send(K, x)
    conn.send(K, x, flags=1)
    conn.recv()


def ours_request(conn, t: torch.Tensor) -> None:
    """One frame and the server's ack (ping-pong)."""
    conn.send(K, {"x": t}, flags=1)
    conn.recv()


def run_interleaved(fns: list, n_msgs: int, rounds: int, max_s: float) -> list[list[float]]:
    """Seconds per message of each function, over interleaved rounds of ``n_msgs`` messages.

    Each round runs every function once; the order rotates (and reverses every other round) so no
    function always goes first or always follows the same one.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    end = time.perf_counter() + max_s
    idx = list(range(len(fns)))
    for r in range(rounds):
        order = idx[r % len(idx):] + idx[:r % len(idx)]
        if r % 2:
            order = order[::-1]
        for i in order:
            t0 = time.perf_counter()
            for _ in range(n_msgs):
                fns[i]()
            times[i].append((time.perf_counter() - t0) / n_msgs)
        if time.perf_counter() > end and r >= 2:
            break
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and messages")
    ap.add_argument("--serve", metavar="CERT_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    torch.set_num_threads(1)
    rounds = 5 if args.quick else 11
    with tempfile.TemporaryDirectory() as d:
        make_certs(d)
        child = subprocess.Popen([sys.executable, __file__, "--serve", d], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            ports = json.loads(child.stdout.readline())
            ctx = TLSConfig(ca=f"{d}/ca.pem").client_context()
            variants = [
                ("tcp, crc on", connect("127.0.0.1", ports["ours"], "bench", TOKENS["bench"], limits=LIMITS),
                 Plain(ports["plain"], None), Plain(ports["reuse"], None)),
                ("tcp, crc off", connect("127.0.0.1", ports["ours"], "bench", TOKENS["bench"], limits=LIMITS,
                                         crc=False), Plain(ports["plain"], None), Plain(ports["reuse"], None)),
                ("tls", connect("127.0.0.1", ports["ours_tls"], "bench", TOKENS["bench"], limits=LIMITS,
                                tls=TLSConfig(ca=f"{d}/ca.pem")), Plain(ports["plain_tls"], ctx),
                 Plain(ports["reuse_tls"], ctx)),
            ]
            rows = []
            print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                  f"python {platform.python_version()}; {rounds} interleaved rounds, medians; throughput = "
                  f"stream of M messages + 1 ack, latency = ping-pong of one message")
            print("| link | size | M | ours MB/s | plain MB/s | ratio | plain (reused buf) MB/s | ratio vs reused "
                  "| ours latency | plain latency |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for label, conn, plain, reuse in variants:
                for size in SIZES:
                    t = torch.randn(size // 4)
                    m = max(4, min(256, STREAM_BYTES // size))
                    if args.quick:
                        m = max(4, m // 4)
                    to, tp, tr = run_interleaved([lambda: ours_stream(conn, t, m), lambda: plain.stream(t, m),
                                                  lambda: reuse.stream(t, m)], 1, rounds,
                                                 max_s=3 if args.quick else 8)
                    mo, mp, mr = (statistics.median(x) / m for x in (to, tp, tr))
                    n_lat = max(1, min(50, (4 << 20) // size)) // (2 if args.quick else 1) or 1
                    lo, lp = run_interleaved([lambda: ours_request(conn, t), lambda: plain.request(t)], n_lat,
                                             rounds, max_s=2 if args.quick else 4)
                    lo, lp = statistics.median(lo), statistics.median(lp)
                    row = {"link": label, "bytes": size, "stream_msgs": m, "ours_MBps": size / mo / 1e6,
                           "plain_MBps": size / mp / 1e6, "ratio": mp / mo, "reuse_MBps": size / mr / 1e6,
                           "ratio_vs_reuse": mr / mo, "ours_latency_ms": lo * 1e3, "plain_latency_ms": lp * 1e3,
                           "rounds": len(to), "latency_msgs_per_round": n_lat}
                    rows.append(row)
                    sz = f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"
                    print(f"| {label} | {sz} | {m} | {row['ours_MBps']:.0f} | {row['plain_MBps']:.0f} "
                          f"| {row['ratio']:.2f} | {row['reuse_MBps']:.0f} | {row['ratio_vs_reuse']:.2f} "
                          f"| {row['ours_latency_ms']:.3f} ms | {row['plain_latency_ms']:.3f} ms |", flush=True)
                conn.close()
                plain.sock.close()
                reuse.sock.close()
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
        finally:
            child.stdin.close()
            child.wait(10)


if __name__ == "__main__":
    main()
