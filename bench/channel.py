"""Channel throughput and per-message latency on loopback: our Connection vs a plain socket.

Pattern (the same for both): the client sends one message of N bytes, the server reads all of
it into memory and answers with a tiny ack; the client waits for the ack before the next
message.  So one message = one request/reply, which is what a training step does.

* ours: ``conn.request(K, {"x": float32 tensor of N bytes})``; the server's handler replies with
  an empty frame.  Plain TCP with the payload CRC32 (the default) and without; TLS (no CRC).
* plain: a TCP_NODELAY socket (or ``ssl`` socket), an 8-byte length prefix then ``sendall`` of the
  tensor's memoryview; the server ``recv_into`` a **freshly allocated** ``torch.empty(n, uint8)``
  per message (as ours must: a received tensor belongs to the caller) and sends 1 byte back.
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
LIMITS = Limits(max_frame_bytes=1 << 28, idle_timeout=None)


# ------------------------------------------------------------------ server side (child process)

def _raw_serve(sock: socket.socket, reuse: bool) -> None:
    """Read length-prefixed messages; into one reused buffer, or a new tensor per message."""
    buf = bytearray(1 << 20)
    hdr = bytearray(8)
    try:
        while True:
            got = 0
            while got < 8:
                k = sock.recv_into(memoryview(hdr)[got:])
                if k == 0:
                    return
                got += k
            (n,) = struct.unpack("<Q", hdr)
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

    def request(self, t: torch.Tensor) -> None:
        mv = memoryview(t.view(torch.uint8).numpy())
        self.sock.sendall(struct.pack("<Q", len(mv)))
        self.sock.sendall(mv)
        if self.sock.recv_into(self.ack) != 1:
            raise ConnectionError("server closed")


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
                  f"python {platform.python_version()}; {rounds} interleaved rounds, medians")
            print("| link | size | ours MB/s | plain MB/s | ratio | ours latency | plain latency "
                  "| plain (reused buf) MB/s | ratio vs reused |")
            print("|---|---|---|---|---|---|---|---|---|")
            for label, conn, plain, reuse in variants:
                for size in SIZES:
                    t = torch.randn(size // 4)
                    n_msgs = max(1, min(200, (8 << 20) // size)) // (2 if args.quick else 1) or 1
                    to, tp, tr = run_interleaved([lambda: conn.request(K, {"x": t}), lambda: plain.request(t),
                                                  lambda: reuse.request(t)], n_msgs, rounds,
                                                 max_s=6 if args.quick else 15)
                    mo, mp, mr = statistics.median(to), statistics.median(tp), statistics.median(tr)
                    row = {"link": label, "bytes": size, "ours_MBps": size / mo / 1e6, "plain_MBps": size / mp / 1e6,
                           "ratio": mp / mo, "ours_latency_ms": mo * 1e3, "plain_latency_ms": mp * 1e3,
                           "reuse_MBps": size / mr / 1e6, "ratio_vs_reuse": mr / mo, "reuse_latency_ms": mr * 1e3,
                           "rounds": len(to), "msgs_per_round": n_msgs}
                    rows.append(row)
                    sz = f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"
                    print(f"| {label} | {sz} | {row['ours_MBps']:.0f} | {row['plain_MBps']:.0f} | {row['ratio']:.2f} "
                          f"| {row['ours_latency_ms']:.3f} ms | {row['plain_latency_ms']:.3f} ms | {row['reuse_MBps']:.0f} "
                          f"| {row['ratio_vs_reuse']:.2f} |", flush=True)
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
