#!/usr/bin/python3
"""Drive caller-kernel with a real Jupyter client (Debian's jupyter_client).

    kernel-test.py setup <cmake> <build dir> <prefix> <build's caller-kernel>
    kernel-test.py <scenario> <prefix>

`setup` installs the build into <prefix> (as `make install` does) and checks
the kernelspecs that `make install` and `caller-kernel install` write. Each
scenario starts the installed kernel from <prefix>'s kernelspec (JUPYTER_PATH
points there, so nothing on the machine is used), runs its checks, and ends
with a shutdown_request after which the kernel process must exit by itself
with status 0 (under ASan that includes the leak check).

Waits are on conditions with deadlines, scaled by CALLER_TEST_TIME_SCALE; the
only upper bounds are the issue's (an interrupt is answered within 1 s, a
kernel_info on control is answered while the shell is busy).
"""
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time

# The kernel checks at exit that no Caller or Pending is left (exit status 3).
os.environ["CALLER_KERNEL_CHECK_LEAKS"] = "1"
SCALE = float(os.environ.get("CALLER_TEST_TIME_SCALE", "1") or 1)
WAIT = 30 * SCALE  # generous deadline for things that take milliseconds


def fail(msg):
    raise AssertionError(msg)


def check(cond, msg):
    if not cond:
        fail(msg)


# ----------------------------------------------------------------- setup


def setup(cmake, build, prefix, build_binary):
    shutil.rmtree(prefix, ignore_errors=True)
    out = subprocess.run([cmake, "--install", build, "--prefix", prefix],
                         capture_output=True, text=True)
    check(out.returncode == 0, "cmake --install failed:\n" + out.stdout + out.stderr)
    spec_path = os.path.join(prefix, "share/jupyter/kernels/caller/kernel.json")
    check(os.path.isfile(spec_path), "make install wrote no " + spec_path)
    with open(spec_path) as f:
        spec = json.load(f)
    exe = os.path.join(prefix, "bin/caller-kernel")
    check(os.access(exe, os.X_OK), "no installed " + exe)
    check(spec["argv"] == [exe, "-f", "{connection_file}"], "argv is %r" % spec["argv"])
    check(spec.get("interrupt_mode") == "message", "interrupt_mode is not message")

    # The subcommand, with --prefix and --user, names the program it runs as.
    with tempfile.TemporaryDirectory() as tmp:
        for args, where in ((["--prefix", tmp + "/p"], tmp + "/p/share/jupyter"),
                            (["--user"], tmp + "/home/.local/share/jupyter")):
            env = dict(os.environ, HOME=tmp + "/home")
            env.pop("XDG_DATA_HOME", None)
            out = subprocess.run([build_binary, "install"] + args, env=env,
                                 capture_output=True, text=True)
            check(out.returncode == 0, "caller-kernel install %s: %s" % (args, out.stderr))
            with open(where + "/kernels/caller/kernel.json") as f:
                spec = json.load(f)
            check(spec["argv"][0] == os.path.realpath(build_binary),
                  "install %s: argv[0] %s" % (args, spec["argv"][0]))
        bad = subprocess.run([build_binary, "install", "--bogus"], capture_output=True)
        check(bad.returncode == 2, "a bad option must fail with usage (2)")
        bad = subprocess.run([build_binary], capture_output=True)
        check(bad.returncode == 2, "no arguments must fail with usage (2)")
        bad = subprocess.run([build_binary, "-f", tmp + "/missing.json"], capture_output=True)
        check(bad.returncode == 1, "a missing connection file must fail (1)")


# ------------------------------------------------------- kernel helpers


class Kernel:
    """The installed kernel, started by a KernelManager, and a client."""

    def __init__(self, prefix):
        self.tmp = tempfile.mkdtemp(prefix="caller-kernel-test-")
        os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share/jupyter")
        os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(self.tmp, "runtime")
        os.environ["JUPYTER_DATA_DIR"] = os.path.join(self.tmp, "data")
        os.environ["JUPYTER_CONFIG_DIR"] = os.path.join(self.tmp, "config")
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="caller")
        resource = os.path.realpath(self.km.kernel_spec.resource_dir)
        check(resource.startswith(os.path.realpath(prefix)), "kernelspec from " + resource)
        self.log_path = os.path.join(self.tmp, "kernel.log")
        self.log = open(self.log_path, "w")
        self.km.start_kernel(stderr=self.log)
        self.proc = self.km.provisioner.process
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=WAIT)
        except BaseException:
            sys.stderr.write("--- kernel stderr ---\n" + self.stderr())
            self.close()
            raise

    def stderr(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def iopub_until_idle(self, msg_id, deadline):
        """Every iopub message with parent msg_id, up to its idle status."""
        msgs = []
        while True:
            left = deadline - time.monotonic()
            check(left > 0, "no idle status for %s; got %s" % (msg_id, [m["msg_type"] for m in msgs]))
            m = self.kc.get_iopub_msg(timeout=left)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            msgs.append(m)
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return msgs

    def reply(self, channel, msg_id, deadline):
        get = self.kc.get_shell_msg if channel == "shell" else self.kc.get_control_msg
        while True:
            left = deadline - time.monotonic()
            check(left > 0, "no %s reply to %s" % (channel, msg_id))
            m = get(timeout=left)
            if m["parent_header"].get("msg_id") == msg_id:
                return m

    def execute(self, code, timeout=WAIT):
        """Run a cell: (execute_reply, its iopub messages busy..idle)."""
        deadline = time.monotonic() + timeout
        msg_id = self.kc.execute(code)
        out = self.iopub_until_idle(msg_id, deadline)
        return self.reply("shell", msg_id, deadline), out

    def wait_for_iopub(self, msg_id, msg_type):
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            check(left > 0, "no %s for %s" % (msg_type, msg_id))
            m = self.kc.get_iopub_msg(timeout=left)
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == msg_type:
                return m

    def control_request(self, msg_type, content=None):
        msg = self.kc.session.msg(msg_type, content or {})
        self.kc.control_channel.send(msg)
        return msg["header"]["msg_id"]

    def shutdown(self):
        """shutdown_request on control; the process must then exit by itself,
        with status 0, leaving no process behind."""
        msg_id = self.kc.shutdown()
        r = self.reply("control", msg_id, time.monotonic() + WAIT)
        check(r["msg_type"] == "shutdown_reply" and r["content"]["status"] == "ok",
              "shutdown_reply: %r" % r["content"])
        try:
            code = self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            fail("the kernel did not exit after shutdown_request")
        check(code == 0, "the kernel exited with %s\n%s" % (code, self.stderr()))
        check(not os.path.exists("/proc/%d" % self.proc.pid), "kernel process still there")
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)  # only cleans up: the process is gone
        check(not self.km.is_alive(), "the manager still sees a kernel")

    def close(self):
        """After a failure: make sure no kernel is left running."""
        try:
            self.kc.stop_channels()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def stream_text(msgs):
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


def check_status_frame(msgs):
    types = [m["msg_type"] for m in msgs]
    check(msgs[0]["msg_type"] == "status" and msgs[0]["content"]["execution_state"] == "busy",
          "the first iopub message is not busy: %s" % types)


# ------------------------------------------------------------ scenarios


def kernel_info(k):
    for channel in ("shell", "control"):
        if channel == "shell":
            msg_id = k.kc.kernel_info()
        else:
            msg_id = k.control_request("kernel_info_request")
        r = k.reply(channel, msg_id, time.monotonic() + WAIT)
        c = r["content"]
        check(r["msg_type"] == "kernel_info_reply", "%s: %s" % (channel, r["msg_type"]))
        check(c["status"] == "ok", c)
        check(c["protocol_version"] == "5.3", c)
        check(c["implementation"] == "caller-kernel", c)
        check(c["language_info"]["name"] and c["language_info"]["mimetype"], c)
        check("%example" in c["banner"], c)
        check(r["header"]["version"] == "5.3", r["header"])
        msgs = k.iopub_until_idle(msg_id, time.monotonic() + WAIT)
        check_status_frame(msgs)


CALLERS_HEAD = re.compile(r"^Name +Running +Protected +Thread$")
SHELL_ROW = re.compile(r"^Shell +✓ +🔐 +<Thread\(Shell, \d+\)> ← current$")
CONTROL_ROW = re.compile(r"^Control +✓ +🔐 +<Thread\(Control, \d+\)>$")
WORKER_ROW = re.compile(r"^caller-worker +✓ +<Thread\(caller-worker, \d+\)>$")


def callers(k):
    r, msgs = k.execute("%callers")
    check(r["content"]["status"] == "ok", r["content"])
    check(r["content"]["execution_count"] == 1, r["content"])
    check_status_frame(msgs)
    check(any(m["msg_type"] == "execute_input" for m in msgs), "no execute_input")
    lines = stream_text(msgs).splitlines()
    check(len(lines) == 4, "the table is %r" % lines)
    check(CALLERS_HEAD.match(lines[0]), "header %r" % lines[0])
    check(lines[1] == "─" * 79, "rule %r" % lines[1])
    check(SHELL_ROW.match(lines[2]), "Shell row %r" % lines[2])
    check(CONTROL_ROW.match(lines[3]), "Control row %r" % lines[3])

    # After %example the workers are in the table too (idle in the pool).
    r, msgs = k.execute("%example jobs=3 seconds=0")
    check(r["content"]["status"] == "ok", r["content"])
    r, msgs = k.execute("%callers")
    lines = stream_text(msgs).splitlines()
    workers = [l for l in lines[2:] if WORKER_ROW.match(l)]
    check(1 <= len(workers) <= 3 and len(lines) == 4 + len(workers), "table %r" % lines)
    check(r["content"]["execution_count"] == 3, r["content"])


def example(k):
    jobs = 50
    r, msgs = k.execute("%%example jobs=%d" % jobs)
    check(r["content"]["status"] == "ok", r["content"])
    check_status_frame(msgs)
    shown = {}  # display_id -> texts, in arrival order
    seen_n = []
    for m in msgs:
        if m["msg_type"] not in ("display_data", "update_display_data"):
            continue
        did = m["content"]["transient"]["display_id"]
        text = m["content"]["data"]["text/plain"]
        if m["msg_type"] == "display_data":
            check(did not in shown, "%s displayed twice" % did)
            shown[did] = []
        else:
            check(did in shown, "update of %s before its display_data" % did)
        shown[did].append(text)
        mt = re.search(r"Caller<caller-worker .*> n=(\d{4}) sleeping \d{3} ms$", text)
        check(mt, "display text %r" % text)
        seen_n.append(int(mt.group(1)))
    # Every job showed its line before the cell's idle status, once.
    check(sorted(seen_n) == list(range(1, jobs + 1)), "jobs shown: %s" % sorted(seen_n))
    # One line per worker; at most max_concurrent (10) workers ran.
    check(1 <= len(shown) <= 10, "%d display ids" % len(shown))
    check(sum(len(v) for v in shown.values()) == jobs, "updates %r" % shown)
    check(len(shown) == 1 or any(len(v) > 1 for v in shown.values()), "no update_display_data")
    text = stream_text(msgs)
    check(text == "Finished: %d\n" % jobs, "stream %r" % text)
    last = [m["msg_type"] for m in msgs][-2:]
    check(last == ["stream", "status"], "the cell ends with %s" % last)


def interrupt(k):
    # Through the manager, as a notebook or console does (interrupt_mode
    # "message": an interrupt_request on control).
    for how in ("manager", "control"):
        sent = time.monotonic()
        msg_id = k.kc.execute("%sleep 30")
        k.wait_for_iopub(msg_id, "execute_input")
        time.sleep(max(0, sent + 0.5 - time.monotonic()))  # the scenario: interrupt after 0.5 s
        t0 = time.monotonic()
        if how == "manager":
            k.km.interrupt_kernel()
        else:
            ir = k.reply("control", k.control_request("interrupt_request"), t0 + WAIT)
            check(ir["msg_type"] == "interrupt_reply" and ir["content"]["status"] == "ok",
                  ir["content"])
        r = k.reply("shell", msg_id, t0 + WAIT)
        took = time.monotonic() - t0
        check(took < 1.0 * SCALE, "%s: the reply took %.3f s" % (how, took))
        c = r["content"]
        check(c["status"] in ("error", "aborted"), c)
        check(c["status"] != "error" or c["ename"] == "KeyboardInterrupt", c)
        msgs = k.iopub_until_idle(msg_id, t0 + WAIT)
        check(any(m["msg_type"] == "error" for m in msgs), "no error on iopub")
        print("interrupt (%s): execute_reply %.1f ms after the interrupt" % (how, took * 1000))

    # Interrupting %example cancels its workers; the kernel goes on.
    msg_id = k.kc.execute("%example jobs=1000 seconds=0.2")
    k.wait_for_iopub(msg_id, "display_data")
    t0 = time.monotonic()
    k.control_request("interrupt_request")
    r = k.reply("shell", msg_id, t0 + WAIT)
    check(r["content"]["status"] == "error", r["content"])
    took = time.monotonic() - t0
    check(took < 1.0 * SCALE, "interrupting %%example: the reply took %.3f s (bound %.1f s)" % (took, 1.0 * SCALE))
    print("interrupt (%%example): execute_reply %.1f ms after the interrupt" % (took * 1000))
    r, msgs = k.execute("%sleep 0")
    check(r["content"]["status"] == "ok", r["content"])


def control_while_busy(k):
    t0 = time.monotonic()
    msg_id = k.kc.execute("%sleep 5")
    k.wait_for_iopub(msg_id, "execute_input")
    info = k.control_request("kernel_info_request")
    r = k.reply("control", info, time.monotonic() + WAIT)
    answered = time.monotonic()
    check(r["msg_type"] == "kernel_info_reply", r["msg_type"])
    # The shell is still in the cell: its reply has not come (other shell
    # messages, such as wait_for_ready's kernel_info replies, may be there).
    check(answered - t0 < 5.0, "control answered only after the cell's 5 s")
    while True:
        try:
            m = k.kc.get_shell_msg(timeout=0)
        except queue.Empty:
            break
        check(m["parent_header"].get("msg_id") != msg_id, "the shell replied before control did")
    print("kernel_info on control while busy: %.1f ms" % ((answered - t0) * 1000))
    r = k.reply("shell", msg_id, t0 + 5 + WAIT)
    check(r["content"]["status"] == "ok", r["content"])
    check(time.monotonic() - t0 >= 5.0, "%sleep 5 ended early")


def shutdown(k):
    r, msgs = k.execute("%example jobs=5 seconds=0")  # workers exist at shutdown
    check(r["content"]["status"] == "ok", r["content"])
    # Kernel.shutdown(), run by main() after every scenario, is this test.


def bad_messages(k):
    import zmq

    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    info = k.km.get_connection_info()
    s.connect("%s://%s:%d" % (info["transport"], info["ip"], info["shell_port"]))
    session = k.kc.session

    def frames(msg_type="kernel_info_request"):
        msg = session.msg(msg_type, {})
        return msg, session.serialize(msg)

    _, good = frames()
    bad_sig = list(good)
    bad_sig[1] = b"0" * 64
    s.send_multipart(bad_sig)
    s.send_multipart(good[:1] + [b""] + good[2:])  # no signature
    s.send_multipart([b"garbage"])  # no delimiter
    s.send_multipart(good[:4])  # too few frames
    for junk in (b"{not json", b"[1, 2]", b'{"no": "msg_type"}', b"\xff\xfe\x00"):
        parts = [junk, good[3], good[4], good[5]]
        s.send_multipart([good[0], session.sign(parts)] + parts)
    msg, good = frames()
    s.send_multipart(good)
    # Requests are served in order: the first reply is the good one's.
    check(s.poll(int(WAIT * 1000)), "no reply to a good message after bad ones")
    reply = session.deserialize(session.feed_identities(s.recv_multipart())[1])
    check(reply["parent_header"]["msg_id"] == msg["header"]["msg_id"], "a bad message was answered")
    check(reply["content"]["status"] == "ok", reply["content"])
    s.close()
    # The kernel still works through the normal client.
    r, _ = k.execute("%callers")
    check(r["content"]["status"] == "ok", r["content"])
    r, msgs = k.execute("no such thing")
    check(r["content"]["status"] == "error" and r["content"]["ename"] == "UnknownCommand",
          r["content"])
    check("no such thing" in r["content"]["evalue"], r["content"])
    check(any(m["msg_type"] == "error" for m in msgs), "no error on iopub")
    log = k.stderr()
    for why in ("bad signature", "no <IDS|MSG> delimiter", "fewer than 5 frames",
                "a JSON frame is not a JSON object", "no msg_type"):
        check("dropped a message: " + why in log, "not logged: %s\n%s" % (why, log))


def console(prefix):
    """The README's `jupyter console --kernel caller` (Debian's jupyter-console),
    fed a few cells on stdin; at the end of input it shuts the kernel down."""
    tmp = tempfile.mkdtemp(prefix="caller-kernel-console-")
    try:
        runtime = os.path.join(tmp, "runtime")
        env = dict(os.environ, HOME=tmp, JUPYTER_PATH=os.path.join(prefix, "share/jupyter"),
                   JUPYTER_RUNTIME_DIR=runtime, JUPYTER_DATA_DIR=os.path.join(tmp, "data"),
                   JUPYTER_CONFIG_DIR=os.path.join(tmp, "config"))
        cells = "%callers\n%example jobs=4 seconds=0\nnonsense\n"
        try:
            out = subprocess.run([sys.executable, "-m", "jupyter_console", "--kernel", "caller",
                                  "--simple-prompt"], input=cells, env=env, capture_output=True,
                                 text=True, timeout=2 * WAIT)
        except subprocess.TimeoutExpired:
            fail("jupyter console did not end")
        text = out.stdout + out.stderr
        check(out.returncode == 0, "jupyter console exited with %d:\n%s" % (out.returncode, text))
        lines = text.splitlines()
        check(any(SHELL_ROW.match(re.sub(r"^In \[\d+\]: ", "", l)) for l in lines),
              "no Shell row:\n" + text)
        check("Finished: 4" in text, "no Finished: 4:\n" + text)
        check("UnknownCommand: 'nonsense'" in text, "no error for nonsense:\n" + text)
        # No process is left with this run's connection file.
        for pid in os.listdir("/proc"):
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            check(runtime.encode() not in cmd, "kernel left running: %r" % cmd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SCENARIOS = {f.__name__: f for f in (kernel_info, callers, example, interrupt,
                                     control_while_busy, shutdown, bad_messages)}


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "setup":
        setup(*sys.argv[2:])
        print("setup: ok")
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "console":
        console(sys.argv[2])
        print("console: ok")
        return 0
    if len(sys.argv) != 3 or sys.argv[1] not in SCENARIOS:
        print(__doc__, file=sys.stderr)
        return 2
    k = Kernel(sys.argv[2])
    ok = False
    try:
        SCENARIOS[sys.argv[1]](k)
        k.shutdown()
        ok = True
    finally:
        if not ok:
            sys.stderr.write("--- kernel stderr ---\n" + k.stderr())
        k.close()
    print("%s: ok" % sys.argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
