#!/usr/bin/env bash
# Runs tests/gdb-target.c under gdb with gdb/caller-gdb.py and checks what
# its commands print: `info callers` lists both Callers, `info caller-tasks`
# every task in its state, `caller-bt` each suspended task's own frames, and
# that the threads' registers are the same after caller-bt as before (the
# program then runs on to a normal exit).
#
#   gdb-test.sh <gdb-target> <caller-gdb.py>
#
# Exit 77 (CTest: skipped) when gdb, its Python support or ptrace is not
# available here.
set -uo pipefail

target=$1
script=$2

skip() {
    echo "gdb-test: skipped: $*"
    exit 77
}

command -v gdb >/dev/null 2>&1 || skip "no gdb (apt-get install gdb)"
[[ "$(gdb -nx -batch -ex 'python print("py-ok")' 2>/dev/null)" == py-ok ]] ||
    skip "this gdb has no Python support"

out=$(mktemp)
cmds=$(mktemp)
trap 'rm -f "$out" "$cmds"' EXIT

fail() {
    echo "gdb-test: $*" >&2
    echo "---- gdb output ----" >&2
    cat "$out" >&2
    exit 1
}

# LeakSanitizer stops the program's threads with ptrace at exit, which it
# cannot do under gdb; the other sanitizer checks stay on.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"

# Each section starts with a marker line, so the checks below look at one
# command's output at a time.
cat >"$cmds" <<'EOF'
set pagination off
set confirm off
set width 0
break gdb_target_ready
run
echo ==regs-before==\n
thread apply all -q info registers rip rsp rbp rbx r12 r13 r14 r15 orig_rax
echo ==info-callers==\n
info callers
echo ==caller-tasks==\n
info caller-tasks
echo ==caller-tasks-copy==\n
info caller-tasks GdbCopy
echo ==caller-bt-all==\n
caller-bt all
echo ==caller-bt-name==\n
caller-bt delta_task
echo ==caller-bt-address==\n
caller-bt beta_pending 2
echo ==caller-bt-unknown==\n
python
try:
    gdb.execute("caller-bt no_such_task")
except gdb.error as e:
    print("error: %s" % e)
end
echo ==regs-after==\n
thread apply all -q info registers rip rsp rbp rbx r12 r13 r14 r15 orig_rax
echo ==selected==\n
frame
echo ==continue==\n
continue
EOF

timeout 100 gdb -nx -q -batch -x "$script" -x "$cmds" "$target" >"$out" 2>&1
rc=$?
if grep -q "ptrace: Operation not permitted\|Could not trace the inferior\|Cannot PTRACE_" "$out"; then
    skip "gdb may not trace processes here (ptrace refused)"
fi
[[ $rc -eq 0 ]] || fail "gdb exited with status $rc"

# The lines of one section (between its marker and the next).
section() {
    awk -v s="==$1==" '$0 == s { on = 1; next } /^==[a-z-]+==$/ { on = 0 } on' "$out"
}
# The lines of task $2's backtrace in section $1.
task_bt() {
    section "$1" | awk -v t="Task '$2' " 'index($0, "Task '\''") == 1 { on = (index($0, t) == 1) } on'
}
expect() { # section, extended regex, what
    section "$1" | grep -Eq -- "$2" || fail "$1: $3 (no line matching '$2')"
}
reject() {
    section "$1" | grep -Eq -- "$2" && fail "$1: $3 (a line matches '$2')"
    return 0
}

grep -q "hit Breakpoint 1, gdb_target_ready" "$out" || fail "the program did not stop in gdb_target_ready"

# info callers: both Callers, running, each on a thread gdb knows, with
# their live and suspended tasks and GdbTarget's one timer.
expect info-callers '^ *#  *Name  *Address  *State  *Thread  *Tasks  *Suspended' "no header"
expect info-callers '^[0-9]+  +GdbTarget +0x[0-9a-f]+ +running +[0-9]+ \(LWP [0-9]+\) +3 +2 +0 +0 +1$' \
    "GdbTarget row wrong"
expect info-callers '^[0-9]+  +GdbCopy +0x[0-9a-f]+ +running +[0-9]+ \(LWP [0-9]+\) +2 +2 ' \
    "GdbCopy row wrong"

# info caller-tasks: every task with its state; the copy-stack Caller has
# one task's bytes on the run stack and the other's saved.
expect caller-tasks "^Caller 'GdbTarget' \(0x[0-9a-f]+\): 3 tasks" "GdbTarget's task count"
expect caller-tasks '^  alpha_task +suspended +0x[0-9a-f]+ +own$' "alpha_task not suspended"
expect caller-tasks '^  beta_task +suspended +0x[0-9a-f]+ +own$' "beta_task not suspended"
expect caller-tasks '^  gamma_task +queued \(delayed\) ' "gamma_task not queued"
expect caller-tasks "^Caller 'GdbCopy' \(0x[0-9a-f]+\): 2 tasks" "GdbCopy's task count"
expect caller-tasks '^  (delta|epsilon)_task +suspended +0x[0-9a-f]+ +copy \(on the run stack\)$' \
    "no copy-stack task on the run stack"
expect caller-tasks '^  (delta|epsilon)_task +suspended +0x[0-9a-f]+ +copy \(saved, [0-9]+ bytes\)$' \
    "no copy-stack task saved off the run stack"
expect caller-tasks-copy '^  delta_task +suspended' "info caller-tasks GdbCopy: no delta_task"
reject caller-tasks-copy 'GdbTarget|alpha_task' "info caller-tasks GdbCopy lists another Caller"

# caller-bt all: each suspended task's backtrace runs from the switch
# through its own functions to the fiber's first frame, and holds no other
# task's functions. gamma_task never started: no backtrace.
for t in alpha beta delta epsilon; do
    case $t in
    alpha | beta) fn=${t}_waits_on_gate ;;
    *) fn=${t}_waits_copied ;;
    esac
    bt=$(task_bt caller-bt-all "${t}_task")
    [[ -n "$bt" ]] || fail "caller-bt all: no backtrace of ${t}_task"
    # Frame 0 is the switch's caller; under ASan, with the ucontext switch,
    # ASan's swapcontext interceptor is frame 0 and that caller frame 1.
    grep -Eq '^#0 +caller__fiber_yield ' <<<"$bt" ||
        { grep -Eq '^#0 .* in (__interceptor_)?swapcontext ' <<<"$bt" &&
            grep -Eq '^#1 +0x[0-9a-f]+ in caller__fiber_yield ' <<<"$bt"; } ||
        fail "caller-bt all: ${t}_task's backtrace does not start at caller__fiber_yield"
    grep -Eq "^#[0-9]+ .* in caller_pending_wait " <<<"$bt" || fail "caller-bt all: no caller_pending_wait in ${t}_task's backtrace"
    grep -Eq "^#[0-9]+ .* in $fn \(" <<<"$bt" || fail "caller-bt all: no $fn in ${t}_task's backtrace"
    grep -Eq "^#[0-9]+ .* in ${t}_task \(" <<<"$bt" || fail "caller-bt all: no ${t}_task frame in its backtrace"
    grep -Eq "^#[0-9]+ .* in (caller__fiber_trampoline|fiber_uc_entry) " <<<"$bt" ||
        fail "caller-bt all: ${t}_task's backtrace does not reach the fiber's first frame"
    others=$(grep -Eo '(alpha|beta|delta|epsilon)_waits_[a-z_]+' <<<"$bt" | grep -v "^$fn\$" || true)
    [[ -z "$others" ]] || fail "caller-bt all: ${t}_task's backtrace shows $others"
done
reject caller-bt-all "^Task 'gamma_task'" "caller-bt all shows a task that never started"

# caller-bt by name and by the address of its Pending (with bt's arguments).
expect caller-bt-name "^Task 'delta_task' " "caller-bt delta_task: no header"
expect caller-bt-name ' in delta_waits_copied \(' "caller-bt delta_task: no delta_waits_copied"
reject caller-bt-name 'epsilon|alpha|beta' "caller-bt delta_task shows other tasks"
expect caller-bt-address "^Task 'beta_task' " "caller-bt beta_pending: not beta_task"
expect caller-bt-address '^#1 ' "caller-bt beta_pending 2: no frame #1"
reject caller-bt-address '^#2 ' "caller-bt beta_pending 2: the frame count was not passed to bt"
expect caller-bt-unknown "^error: libcaller: no task 'no_such_task'" "caller-bt of an unknown task: no error"

# The threads' registers, the selected thread and frame are as before, and
# the program runs on to its end.
diff <(section regs-before) <(section regs-after) >/dev/null ||
    fail "registers differ after caller-bt: $(diff <(section regs-before) <(section regs-after) | head -20)"
[[ $(section regs-before | grep -c '^rip ') -ge 3 ]] || fail "no registers of 3 threads were read"
expect selected '^#0 +gdb_target_ready ' "the selected frame was not restored"
expect continue '^gdb-target: done$' "the program did not finish its checks after the commands"
expect continue 'exited normally' "the program did not exit normally"

echo "gdb-test: ok ($(basename "$target"))"
