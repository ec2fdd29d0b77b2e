"""A stand-in for a guest: keeps a RAM file and dirties its pages at a set rate.

Usage: python workload.py PATH SIZE_BYTES RATE_BYTES_PER_S [FILL_FRACTION]

Fills FILL_FRACTION of the file with incompressible data first, prints READY, then walks across
the filled part rewriting pages (so each pass dirties new pages, as a real guest would), in
small time slices to hold the rate. Prints DIRTY <bytes/s> with the achieved rate every second.
SIGSTOP/SIGCONT pause it, which is how the file driver pauses this "domain".
"""

import os
import sys
import time

import numpy as np

PAGE = 4096


def main() -> None:
    path, size, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    fill = float(sys.argv[4]) if len(sys.argv) > 4 else 0.75
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    filled_pages = int(size * fill) // PAGE
    chunk = 256
    for p in range(0, filled_pages, chunk):
        n = min(chunk, filled_pages - p)
        os.pwrite(fd, rng.bytes(n * PAGE), p * PAGE)
    print("READY", flush=True)
    if rate <= 0 or filled_pages == 0:
        while True:
            time.sleep(3600)
    slice_s = 0.01
    per_slice = max(1, int(rate * slice_s / PAGE))
    cursor = 0
    written = 0
    t_report = t0 = time.monotonic()
    next_t = t0
    while True:
        n = min(per_slice, filled_pages - cursor)
        os.pwrite(fd, rng.bytes(n * PAGE), cursor * PAGE)
        written += n * PAGE
        cursor = (cursor + n) % filled_pages
        next_t += slice_s * n / per_slice
        now = time.monotonic()
        if now - t_report >= 1.0:
            print(f"DIRTY {written / (now - t0):.0f}", flush=True)
            t_report = now
        if next_t > now:
            time.sleep(next_t - now)


if __name__ == "__main__":
    main()
