#!/usr/bin/env python3
"""Server memory per idle connection: a keep-alive connection after one GET /healthz, or one holding a watch.

Starts `sandboxd-o apiserver` (memory store) on a loopback port, opens N connections of one kind,
and prints the server's RSS growth per connection. Used for docs/benchmarks.md, "Watch fan-out".

    python3 hack/conn-mem.py target/release/sandboxd-o healthz 5000
    python3 hack/conn-mem.py target/release/sandboxd-o watch 5000
"""
import signal
import socket
import subprocess
import sys
import time

binary, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode not in ("healthz", "watch"):
    sys.exit("mode is healthz or watch")
port = 18555
room = str(n + 1000)
server = subprocess.Popen(
    [binary, "apiserver", "--insecure-listen", f"127.0.0.1:{port}", "--store", "memory://",
     "--max-connections", room, "--max-watches", room, "--max-watches-per-identity", room,
     "--max-inflight-long-running", room],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rss_kib():
    with open(f"/proc/{server.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


try:
    time.sleep(1.5)
    before = rss_kib()
    path = "/healthz" if mode == "healthz" else "/api/v1/nodes?watch=true"
    held = []
    for _ in range(n):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                sys.exit("the server closed a connection")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            sys.exit(f"refused: {head.splitlines()[0]!r}")
        held.append(conn)
    time.sleep(2)
    after = rss_kib()
    print(f"{mode}: {n} connections, server RSS {before} -> {after} KiB, {(after - before) * 1024 // n} bytes each")
finally:
    server.send_signal(signal.SIGKILL)
    server.wait()
