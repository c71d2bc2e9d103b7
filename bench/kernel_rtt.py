#!/usr/bin/python3
"""execute_request round trips of an empty cell: caller-kernel and ipykernel.

    /usr/bin/python3 bench/kernel_rtt.py [--n 2000] [--block 200] [--warmup 100]
                                          [--kernel build-release/caller-kernel]

Both kernels are started by jupyter_client (Debian's python3-jupyter-client)
in the same run: caller-kernel from a kernelspec written into a temporary
directory by `caller-kernel install --prefix`, ipykernel (Debian's
python3-ipykernel) from its own "python3" kernelspec. After a warm-up, the
requests go in blocks of --block, alternating between the kernels, so both
see the same machine load. Each round trip is timed from sending the
execute_request to receiving (a) its execute_reply on shell and (b) its
"idle" status on iopub (what a notebook waits for before it calls a cell
done). Prints p50, p99 and mean in ms for each, and the ratio caller/ipykernel.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def percentile(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Timed:
    def __init__(self, name, km):
        self.name = name
        self.km = km
        km.start_kernel()
        self.kc = km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.reply_ms, self.idle_ms = [], []

    def one(self, record):
        kc = self.kc
        t0 = time.perf_counter()
        msg_id = kc.execute("")
        reply = idle = None
        while reply is None:
            m = kc.get_shell_msg(timeout=30)
            if m["parent_header"].get("msg_id") == msg_id:
                reply = time.perf_counter()
                if m["content"]["status"] != "ok":
                    raise RuntimeError("%s: %r" % (self.name, m["content"]))
        while idle is None:
            m = kc.get_iopub_msg(timeout=30)
            if (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                    and m["content"]["execution_state"] == "idle"):
                idle = time.perf_counter()
        if record:
            self.reply_ms.append((reply - t0) * 1000)
            self.idle_ms.append((max(idle, reply) - t0) * 1000)

    def stop(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="timed round trips per kernel")
    ap.add_argument("--block", type=int, default=200, help="requests per turn")
    ap.add_argument("--warmup", type=int, default=100, help="untimed round trips first")
    ap.add_argument("--kernel", default=None, help="the caller-kernel program")
    a = ap.parse_args()
    exe = a.kernel
    if not exe:
        for d in ("build-release", "build"):
            cand = os.path.join(here, "..", d, "caller-kernel")
            if os.access(cand, os.X_OK):
                exe = cand
                break
    if not exe or not os.access(exe, os.X_OK):
        sys.exit("kernel_rtt.py: no caller-kernel; build it (make) or pass --kernel")
    exe = os.path.realpath(exe)

    tmp = tempfile.mkdtemp(prefix="kernel-rtt-")
    try:
        subprocess.run([exe, "install", "--prefix", tmp], check=True, stdout=subprocess.DEVNULL)
        os.environ["JUPYTER_PATH"] = os.path.join(tmp, "share/jupyter")
        os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(tmp, "runtime")
        # ipykernel's debugger warns about frozen modules on every start.
        os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        from jupyter_client.manager import KernelManager
        import ipykernel
        import jupyter_client

        kernels = [Timed("caller-kernel", KernelManager(kernel_name="caller")),
                   Timed("ipykernel", KernelManager(kernel_name="python3"))]
        print("kernel_rtt: %s vs ipykernel %s, jupyter_client %s; %d round trips each "
              "(blocks of %d, alternating) after %d warm-up; %d cores; load %s"
              % (exe, ipykernel.__version__, jupyter_client.__version__, a.n, a.block, a.warmup,
                 os.cpu_count(), open("/proc/loadavg").read().split()[:3]))
        for k in kernels:
            for _ in range(a.warmup):
                k.one(False)
        done = 0
        while done < a.n:
            step = min(a.block, a.n - done)
            for k in kernels:
                for _ in range(step):
                    k.one(True)
            done += step
        for k in kernels:
            k.stop()
        print("%-14s %10s %10s %10s   %10s %10s %10s" % ("kernel", "reply p50", "p99", "mean",
                                                       "idle p50", "p99", "mean"))
        for k in kernels:
            print("%-14s %10.3f %10.3f %10.3f   %10.3f %10.3f %10.3f ms" % (
                k.name, percentile(k.reply_ms, 50), percentile(k.reply_ms, 99),
                statistics.mean(k.reply_ms), percentile(k.idle_ms, 50),
                percentile(k.idle_ms, 99), statistics.mean(k.idle_ms)))
        c, p = kernels
        print("%-14s %10.2f %10.2f %10.2f   %10.2f %10.2f %10.2f" % (
            "caller/ipyk", percentile(c.reply_ms, 50) / percentile(p.reply_ms, 50),
            percentile(c.reply_ms, 99) / percentile(p.reply_ms, 99),
            statistics.mean(c.reply_ms) / statistics.mean(p.reply_ms),
            percentile(c.idle_ms, 50) / percentile(p.idle_ms, 50),
            percentile(c.idle_ms, 99) / percentile(p.idle_ms, 99),
            statistics.mean(c.idle_ms) / statistics.mean(p.idle_ms)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
