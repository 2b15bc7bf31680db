"""The daemon's side of `sandbox stats`: GET /v1/stats over the API socket, timed from the
request to the last byte; prints the median in milliseconds.

Usage: bench_stats.py SOCKET RUNS
"""
import socket
import statistics
import sys
import time


def call(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"GET /v1/stats?running=true HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    resp = b""
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        resp += chunk
    s.close()
    if not resp.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"GET /v1/stats failed: {resp[:200]!r}")


def main():
    path, runs = sys.argv[1], int(sys.argv[2])
    call(path)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call(path)
        times.append(time.perf_counter() - t)
    print(f"{statistics.median(times) * 1000:.1f}")


main()
