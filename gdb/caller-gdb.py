# libcaller's gdb commands: the Callers of the program being debugged, their
# tasks, and the backtraces of suspended tasks.
#
#   info callers                     the live Callers (the registry)
#   info caller-tasks [CALLER]       the tasks of one Caller (name, address
#                                    or number from `info callers`) or all
#   caller-bt TASK|all [BT-ARGS]     backtrace of a task (its name or the
#                                    address of its Pending), or of every
#                                    task; BT-ARGS go to `bt` (full, 5, ...)
#
# Load it with `source <prefix>/share/libcaller/gdb/caller-gdb.py`; gdb
# loads it by itself where the auto-load copy is installed (see the README,
# "Debugging"). It reads libcaller's private structures through the
# library's debug information (build with -g: the default RelWithDebInfo
# build has it), so it works for the build it came with; a layout it does
# not recognise is reported, not guessed.
#
# How caller-bt shows a suspended task: a suspended fiber is a saved
# context (src/switch_x86_64.S: the callee-saved registers, then the return
# address, at the saved stack pointer; with the ucontext fallback a
# ucontext_t). For the backtrace the script loads those registers into the
# Caller's thread, runs `bt`, and puts the thread's own registers back
# (orig_rax too, in case a register write reset it: gdb's own pc writes set
# it to -1, and then a system call the thread was in would not restart when
# it resumes). A copy-stack task (CALLER_STACK_COPY)
# whose bytes are not on the run stack has them copied there for the
# backtrace and the run stack's own bytes copied back afterwards. Both
# need a live process (not a core file). Only x86_64 is supported.

import gdb

# CALLER__PENDING_SIZE (src/pending.h): a task lives this many bytes after
# the start of its Pending. A macro, so not in the debug information.
PENDING_SIZE = 88
# F_NAME_ONLY (src/pending.c): a Pending's `ext` holds its name itself.
F_NAME_ONLY = 1 << 11

CALLER_STATES = ["initial", "starting", "running", "stopping", "stopped"]
# caller__task_state_t (src/task.h)
TASK_STATES = ["queued", "delayed", "ready", "running", "suspended", "done"]
TASK_RUNNING = 3
TASK_SUSPENDED = 4
MSG_TASK = 1  # CALLER__MSG_TASK (src/inbox.h)
LIST_MAX = 1000000  # a bound on every list walk: a corrupt list ends it

# x86_64 ucontext_t gregs indices (<sys/ucontext.h>)
UC_GREGS = {"r12": 4, "r13": 5, "r14": 6, "r15": 7, "rbp": 10, "rbx": 11, "rsp": 15, "rip": 16}
# The registers a fiber switch saves and the script loads: callee-saved,
# stack and frame pointer, pc. orig_rax is saved and restored only.
SWITCH_REGS = ["rip", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15"]


class CallerGdbError(gdb.GdbError):
    pass


def _type(name):
    try:
        return gdb.lookup_type(name)
    except gdb.error:
        raise CallerGdbError(
            "libcaller: type '%s' not found: is libcaller's debug information loaded "
            "(a build with -g, and the program started)?" % name
        )


def _offset(struct_type, field):
    for f in struct_type.strip_typedefs().fields():
        if f.name == field:
            return f.bitpos // 8
    raise CallerGdbError("libcaller: %s has no field '%s'" % (struct_type, field))


def _has_field(struct_type, field):
    return any(f.name == field for f in struct_type.strip_typedefs().fields())


def _container_of(ptr, struct_type, field):
    """The struct_type * whose member `field` is at ptr."""
    char_p = gdb.lookup_type("char").pointer()
    return (ptr.cast(char_p) - _offset(struct_type, field)).cast(struct_type.pointer())


def _addr(v):
    return int(v.cast(gdb.lookup_type("unsigned long")))


def _string(p):
    if _addr(p) == 0:
        return None
    try:
        raw = bytes(gdb.selected_inferior().read_memory(_addr(p), 256))
    except gdb.MemoryError:
        try:
            return p.string()
        except (gdb.error, gdb.MemoryError, UnicodeDecodeError):
            return "<unreadable>"
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _symbol_at(addr):
    try:
        block = gdb.block_for_pc(addr)
        while block is not None and block.function is None:
            block = block.superblock
        if block is not None:
            return block.function.print_name
    except (RuntimeError, gdb.error):
        pass
    return "0x%x" % addr


# ---- the data -------------------------------------------------------------


def _registries():
    """The registry list heads (caller.c's static `registry`), one per copy
    of the library in the program (normally one)."""
    link_t = _type("caller__link_t")
    heads, seen = [], set()
    for sym in gdb.lookup_static_symbols("registry"):
        try:
            v = sym.value()
        except gdb.error:
            continue
        if v.type.strip_typedefs() != link_t.strip_typedefs():
            continue
        a = _addr(v.address)
        if a not in seen:
            seen.add(a)
            heads.append(v)
    if not heads:
        raise CallerGdbError(
            "libcaller: its Caller registry was not found: is libcaller's debug "
            "information loaded (a build with -g, and the program started)?"
        )
    return heads


def _walk(head_addr, first, next_of):
    """Nodes of a list from `first`, until the head (or NULL)."""
    node, n = first, 0
    while _addr(node) != 0 and _addr(node) != head_addr and n < LIST_MAX:
        yield node
        node = next_of(node)
        n += 1


def callers():
    """The registered Callers (struct caller *), in registry order."""
    caller_t = _type("struct caller")
    out = []
    for head in _registries():
        for link in _walk(_addr(head.address), head["next"], lambda l: l["next"]):
            out.append(_container_of(link, caller_t, "reg"))
    return out


def _caller_state(c):
    s = int(c["state"])
    return CALLER_STATES[s] if 0 <= s < len(CALLER_STATES) else str(s)


def _thread_of(c):
    tid = int(c["tid"])
    inf = gdb.selected_inferior()
    for th in inf.threads():
        if th.ptid[1] == tid:
            return th
    return None


def _fifo_len(fifo):
    return sum(1 for _ in _walk(0, fifo["head"], lambda m: m["next"]))


class Task(object):
    def __init__(self, caller, task, where):
        self.caller = caller
        self.task = task  # caller__task_t *
        char_p = gdb.lookup_type("char").pointer()
        self.pending = (task.cast(char_p) - PENDING_SIZE).cast(
            _type("struct caller_pending").pointer()
        )
        self.where = where  # "inbox" or "loop"
        self.state = int(task["state"]) if where == "loop" else 0

    @property
    def name(self):
        # pending.c: `ext` is the name itself with F_NAME_ONLY, else the
        # out-of-line part (or NULL).
        ext = self.pending["ext"]
        if int(self.pending["flags"]) & F_NAME_ONLY:
            n = _string(ext)
        elif _addr(ext):
            n = _string(ext.cast(_type("struct caller__pending_ext").pointer())["name"])
        else:
            n = None
        if n:
            return n
        if self.state in (0, 1, 2) and _addr(self.task["fiber"]) == 0:
            return _symbol_at(_addr(self.task["u"]["fn"]))
        return "<unnamed>"

    @property
    def state_text(self):
        if self.where == "inbox":
            return "queued (inbox)"
        s = self.state
        if s == 1:
            return "queued (delayed)"
        if s == 2:
            return "queued (ready)" if _addr(self.task["fiber"]) == 0 else "ready (resumed)"
        return TASK_STATES[s] if 0 <= s < len(TASK_STATES) else str(s)

    @property
    def fiber(self):
        f = self.task["fiber"]
        return f if _addr(f) != 0 else None


def tasks(c):
    """A Caller's tasks: those its loop accepted (live_tasks), then those
    still in its inbox."""
    task_t = _type("caller__task_t")
    out = []
    head = c["live_tasks"]
    for link in _walk(_addr(head.address), head["next"], lambda l: l["next"]):
        out.append(Task(c, _container_of(link, task_t, "live"), "loop"))
    for m in _walk(0, c["inbox"]["q"]["head"], lambda m: m["next"]):
        if int(m["kind"]) == MSG_TASK:
            out.append(Task(c, _container_of(m, task_t, "msg"), "inbox"))
    return out


def _find_caller(arg):
    all_c = callers()
    arg = arg.strip()
    if arg.startswith("#") or arg.isdigit():
        i = int(arg.lstrip("#"))
        if 1 <= i <= len(all_c):
            return all_c[i - 1]
        raise CallerGdbError("libcaller: no Caller number %d (see `info callers`)" % i)
    found = [c for c in all_c if c["name"].string() == arg]
    if found:
        return found[0]
    try:
        a = int(gdb.parse_and_eval(arg).cast(gdb.lookup_type("unsigned long")))
    except gdb.error:
        a = None
    for c in all_c:
        if _addr(c) == a:
            return c
    raise CallerGdbError("libcaller: no live Caller '%s' (see `info callers`)" % arg)


# ---- info callers ---------------------------------------------------------


class InfoCallers(gdb.Command):
    """List the live Callers: number, name, address, state, thread, tasks
(live, of which suspended) and work queued (inbox messages, ready tasks,
timers). These are the Callers of the library's registry, as caller_all()
sees them: a Caller leaves it when it starts stopping.
Usage: info callers"""

    def __init__(self):
        super(InfoCallers, self).__init__("info callers", gdb.COMMAND_STATUS)

    def invoke(self, arg, from_tty):
        cs = callers()
        if not cs:
            print("No live Callers.")
            return
        rows = [("#", "Name", "Address", "State", "Thread", "Tasks", "Suspended", "Inbox",
                 "Ready", "Timers")]
        for i, c in enumerate(cs, 1):
            th = _thread_of(c)
            thread = "%d (LWP %d)" % (th.num, int(c["tid"])) if th else "LWP %d" % int(c["tid"])
            rows.append((
                str(i),
                c["name"].string(),
                "0x%x" % _addr(c),
                _caller_state(c),
                thread,
                str(int(c["nlive"])),
                str(int(c["stats"]["suspended"])),
                str(_fifo_len(c["inbox"]["q"])),
                str(_fifo_len(c["ready"])),
                str(int(c["timers"]["n"])),
            ))
        _print_rows(rows)


def _print_rows(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


# ---- info caller-tasks ----------------------------------------------------


class InfoCallerTasks(gdb.Command):
    """List the tasks of a Caller, or of every live Caller: name, state
(running, suspended, ready, or queued: in the inbox, delayed or ready to
start), the address of its Pending, and its stack (own, or copy-stack
with where its bytes are now).
Usage: info caller-tasks [CALLER]
CALLER is a Caller's name, its address, or its number in `info callers`."""

    def __init__(self):
        super(InfoCallerTasks, self).__init__("info caller-tasks", gdb.COMMAND_STATUS)

    def invoke(self, arg, from_tty):
        cs = [_find_caller(arg)] if arg.strip() else callers()
        if not cs:
            print("No live Callers.")
            return
        for c in cs:
            ts = tasks(c)
            print("Caller '%s' (0x%x): %d task%s" % (c["name"].string(), _addr(c), len(ts),
                                                     "" if len(ts) == 1 else "s"))
            if not ts:
                continue
            rows = [("  Name", "State", "Pending", "Stack")]
            for t in ts:
                rows.append(("  " + t.name, t.state_text, "0x%x" % _addr(t.pending),
                             _stack_text(t)))
            _print_rows(rows)


def _stack_text(t):
    f = t.fiber
    if f is None:
        return "-"
    fiber_t = _type("struct caller__fiber")
    if _has_field(fiber_t, "copied") and bool(f["copied"]):
        resident = _addr(f["owner"]["resident"]) == _addr(f)
        return "copy (%s)" % ("on the run stack" if resident
                              else "saved, %d bytes" % int(f["saved_len"]))
    return "own"


# ---- caller-bt ------------------------------------------------------------


def _read_u64(addr):
    return int.from_bytes(bytes(gdb.selected_inferior().read_memory(addr, 8)), "little")


def _saved_regs(f):
    """The registers of suspended fiber f, as its switch saved them."""
    fiber_t = _type("struct caller__fiber")
    if _has_field(fiber_t, "sp"):
        sp = _addr(f["sp"])
        # src/switch_x86_64.S: the saved frame from the saved rsp up
        regs = {"r15": 8, "r14": 16, "r13": 24, "r12": 32, "rbx": 40, "rbp": 48, "rip": 56}
        out = {r: _read_u64(sp + off) for r, off in regs.items()}
        out["rsp"] = sp + 64
        return out
    if _has_field(fiber_t, "uc"):
        gregs = f["uc"]["uc_mcontext"]["gregs"]
        return {r: int(gregs[i]) & 0xFFFFFFFFFFFFFFFF for r, i in UC_GREGS.items()}
    raise CallerGdbError("libcaller: struct caller__fiber has neither 'sp' nor 'uc'")


def _check_arch():
    arch = gdb.selected_frame().architecture().name()
    if "x86-64" not in arch:
        raise CallerGdbError(
            "libcaller: caller-bt supports x86_64 only, not %s: a suspended "
            "task's saved registers are laid out per architecture" % arch)


class _CopiedStack(object):
    """Puts a suspended copy-stack fiber's bytes back on its run stack for
    the backtrace (if another fiber's are there), and the run stack's own
    bytes back afterwards."""

    def __init__(self, f):
        self.f, self.undo = f, None

    def __enter__(self):
        f = self.f
        fiber_t = _type("struct caller__fiber")
        if not (_has_field(fiber_t, "copied") and bool(f["copied"])):
            return self
        owner = f["owner"]
        if _addr(owner["resident"]) == _addr(f):
            return self  # its bytes are there
        n = int(f["saved_len"])
        top = _addr(owner["run"])
        inf = gdb.selected_inferior()
        saved = bytes(inf.read_memory(_addr(f["saved"]), n))
        old = bytes(inf.read_memory(top - n, n))
        inf.write_memory(top - n, saved)
        self.undo = (top - n, old)
        return self

    def __exit__(self, *exc):
        if self.undo:
            gdb.selected_inferior().write_memory(self.undo[0], self.undo[1])
        return False


def _set_reg(name, value):
    gdb.execute("set $%s = %d" % (name, value), to_string=True)


def _backtrace_suspended(t, bt_args):
    f = t.fiber
    th = _thread_of(t.caller)
    if th is None:
        raise CallerGdbError("libcaller: the thread of Caller '%s' (LWP %d) is not in this "
                             "inferior" % (t.caller["name"].string(), int(t.caller["tid"])))
    th.switch()
    gdb.newest_frame().select()
    frame0 = gdb.newest_frame()
    keep = {r: int(frame0.read_register(r)) & 0xFFFFFFFFFFFFFFFF for r in SWITCH_REGS}
    try:
        keep_orig_rax = int(frame0.read_register("orig_rax"))
    except (ValueError, gdb.error):
        keep_orig_rax = None
    out = None
    with _CopiedStack(f):
        regs = _saved_regs(f)
        try:
            for r in SWITCH_REGS:
                _set_reg(r, regs[r])
            out = gdb.execute("bt " + bt_args, to_string=True)
        finally:
            for r in SWITCH_REGS:
                _set_reg(r, keep[r])
            # As it was, so that an interrupted system call restarts as it
            # would have (see the top of the file).
            if keep_orig_rax is not None:
                _set_reg("orig_rax", keep_orig_rax)
    return out


def _backtrace(t, bt_args):
    """The backtrace text of task t, or a line saying why there is none."""
    if t.where == "inbox" or t.fiber is None:
        return "(not started: no stack yet)\n"
    if t.state == TASK_RUNNING:
        th = _thread_of(t.caller)
        if th is None:
            return "(running, but its thread is not in this inferior)\n"
        th.switch()
        return "(running: the backtrace of thread %d)\n%s" % (
            th.num, gdb.execute("bt " + bt_args, to_string=True))
    if t.state == TASK_SUSPENDED or t.state == 2:
        return _backtrace_suspended(t, bt_args)
    return "(%s: no stack)\n" % t.state_text


class CallerBt(gdb.Command):
    """Backtrace of a libcaller task, as if it were running.
Usage: caller-bt TASK|all [BT-ARGS]
TASK is a task's name (every task of that name, in every live Caller), or
the address of its Pending or of its task; `all` is every started task of
every live Caller. BT-ARGS are passed to `bt` (e.g. `full`, a frame count).
A suspended task's saved registers are loaded into its Caller's thread for
the backtrace and the thread's own registers put back afterwards; the
selected thread and frame are restored too. Needs a live process on
x86_64, asm or ucontext fibers."""

    def __init__(self):
        super(CallerBt, self).__init__("caller-bt", gdb.COMMAND_STACK)

    def invoke(self, arg, from_tty):
        words = arg.split(None, 1)
        if not words:
            raise CallerGdbError("usage: caller-bt TASK|all [BT-ARGS]")
        which, bt_args = words[0], (words[1] if len(words) > 1 else "")
        _check_arch()
        all_tasks = [t for c in callers() for t in tasks(c)]
        if which == "all":
            chosen = [t for t in all_tasks if t.fiber is not None]
        else:
            chosen = [t for t in all_tasks if t.name == which]
            if not chosen:
                try:
                    a = int(gdb.parse_and_eval(which).cast(gdb.lookup_type("unsigned long")))
                except gdb.error:
                    a = None
                chosen = [t for t in all_tasks if a in (_addr(t.pending), _addr(t.task))]
            if not chosen:
                raise CallerGdbError("libcaller: no task '%s' in a live Caller (see `info "
                                     "caller-tasks`)" % which)
        thread = gdb.selected_thread()
        level = gdb.selected_frame().level()
        try:
            for t in chosen:
                print("Task '%s' (Pending 0x%x) of Caller '%s', %s:" % (
                    t.name, _addr(t.pending), t.caller["name"].string(), t.state_text))
                gdb.write(_backtrace(t, bt_args))
        finally:
            if thread is not None and thread.is_valid():
                thread.switch()
                gdb.execute("frame %d" % level, to_string=True)


InfoCallers()
InfoCallerTasks()
CallerBt()
