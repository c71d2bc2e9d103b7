#!/usr/bin/env bash
# Builds the Debian package (`make package`: CPack, DEB), checks what is in
# it, installs it with dpkg -i, builds and runs a small program against the
# installed package (pkg-config from the system's directories only), checks
# that caller.h (with the packaged caller_config.h) compiles with no flags
# at all, checks the installed kernelspec, and removes the package again.
#
#   package-test.sh <build dir> <cmake> <cc>
#
# Installing needs root: otherwise, or when libcaller-dev is already
# installed on this machine (it would be replaced, then removed), the test
# stops after the contents check with status 77 (skipped).
set -euo pipefail

build=$(cd "$1" && pwd)
cmake=$2
cc=$3
cpack=$(dirname "$cmake")/cpack
tmp=$(mktemp -d)
installed=0
cleanup() {
    if ((installed)); then
        dpkg -r libcaller-dev >/dev/null 2>&1 || echo "package-test: dpkg -r failed" >&2
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

fail() {
    echo "package-test: $*" >&2
    exit 1
}

echo "package-test: cpack -G DEB"
"$cpack" -G DEB --config "$build/CPackConfig.cmake" -B "$tmp/pkg" >"$tmp/cpack.log" 2>&1 ||
    { cat "$tmp/cpack.log" >&2; fail "cpack failed"; }
deb=$(find "$tmp/pkg" -maxdepth 1 -name 'libcaller-dev_*.deb' | head -n1)
[[ -n $deb ]] || fail "no libcaller-dev_*.deb made"
echo "package-test: $(basename "$deb")"

contents=$(dpkg-deb -c "$deb")
for f in ./usr/include/caller.h ./usr/include/caller_config.h ./usr/lib/libcaller.so ./usr/lib/libcaller.so.0.1 \
    ./usr/lib/libcaller.a ./usr/lib/pkgconfig/caller.pc ./usr/lib/cmake/caller/callerConfig.cmake \
    ./usr/lib/cmake/caller/callerTargets.cmake ./usr/lib/cmake/caller/callerSharedTargets.cmake \
    ./usr/bin/caller-kernel ./usr/share/jupyter/kernels/caller/kernel.json \
    ./usr/share/libcaller/gdb/caller-gdb.py ./usr/share/gdb/auto-load/usr/lib/libcaller.so.0.1.0-gdb.py; do
    grep -q " $f\( \|$\)" <<<"$contents" || fail "$f is not in the package"
done
# The man pages are in it when `make docs` made them (CI does, before
# `make test`; `make package` does too).
src=$(cd "$(dirname "$0")/.." && pwd)
if [[ -d $src/build/docs/man/man3 ]]; then
    for f in ./usr/share/man/man3/caller.h.3 ./usr/share/man/man3/caller_pending_wait.3; do
        grep -q " $f\( \|$\)" <<<"$contents" || fail "$f is not in the package"
    done
else
    echo "package-test: no build/docs/man (make docs not run): man pages not checked"
fi
[[ $(dpkg-deb -f "$deb" Package) == libcaller-dev ]] || fail "wrong package name"
depends=$(dpkg-deb -f "$deb" Depends)
[[ $depends == *libuv1-dev* ]] || fail "Depends lacks libuv1-dev: $depends"
echo "package-test: contents ok; Depends: $depends"

if [[ $(id -u) -ne 0 ]]; then
    echo "package-test: not root: dpkg -i skipped"
    exit 77
fi
if dpkg -s libcaller-dev >/dev/null 2>&1; then
    echo "package-test: libcaller-dev is installed on this machine: dpkg -i skipped"
    exit 77
fi

echo "package-test: dpkg -i"
dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log" >&2; fail "dpkg -i failed"; }
installed=1

mkdir "$tmp/app"
cat >"$tmp/app/prog.c" <<'PROG'
#include <caller.h>
#include <stdio.h>
#include <stdint.h>
static void *answer(void *arg) { return (void *)((intptr_t)arg + 1); }
int main(void)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, NULL);
    caller_pending_t *p = c ? caller_call_soon(c, answer, (void *)41) : NULL;
    void *v = NULL;
    if (!p || caller_pending_wait(p, 10, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v) != 0)
        return 1;
    printf("packaged says %d\n", (int)(intptr_t)v);
    caller_pending_unref(p);
    caller_stop(c, 0);
    caller_wait_stopped(c, 10);
    caller_unref(c);
    return 0;
}
PROG
# The system's pkg-config directories only: not a copy under /usr/local.
export PKG_CONFIG_LIBDIR=/usr/lib/pkgconfig:/usr/share/pkgconfig:/usr/lib/$(gcc -print-multiarch)/pkgconfig
flags=$(pkg-config --cflags --libs caller) || fail "pkg-config does not find the packaged caller.pc"
cflags=$(pkg-config --static --cflags caller)
[[ $cflags != *-D* ]] || fail "caller.pc gives -D flags: $cflags (they belong in caller_config.h)"
# The header is self-sufficient: /usr/include is searched anyway, and the
# build's options come from caller_config.h, not from flags.
cat >"$tmp/app/config.c" <<'PROG'
#include <caller.h>
#if !defined(CALLER_WITH_ZMQ) || (CALLER_WITH_ZMQ != 0 && CALLER_WITH_ZMQ != 1)
#error "caller.h did not define CALLER_WITH_ZMQ as 0 or 1 (caller_config.h)"
#endif
int main(void) { return caller_version() == CALLER_VERSION_HEX ? 0 : 1; }
PROG
(cd "$tmp/app" && "$cc" -Wall -Werror config.c -lcaller -o config && ./config) ||
    fail "a program including caller.h does not build and run with only -lcaller"
echo "package-test: caller.h with caller_config.h builds with no flags"
(cd "$tmp/app" && "$cc" -Wall -Werror prog.c $flags -o prog) || fail "building against the package failed"
loads=$(ldd "$tmp/app/prog" | awk '$1 == "libcaller.so.0.1" { print $3 }')
# (on a merged-/usr system ldd may name it /lib/...: the same file)
[[ -n $loads && $(readlink -f "$loads") == /usr/lib/libcaller.so.0.1.0 ]] ||
    fail "the program does not load the packaged library: $(ldd "$tmp/app/prog" | grep libcaller)"
out=$("$tmp/app/prog") || fail "the program failed: $out"
[[ $out == "packaged says 42" ]] || fail "the program printed '$out'"
echo "package-test: $out"
if [[ -d $src/build/docs/man/man3 ]]; then
    man -w caller_pending_wait >/dev/null 2>&1 || [[ -f /usr/share/man/man3/caller_pending_wait.3 ]] ||
        fail "no installed man page caller_pending_wait(3)"
fi
grep -q '"/usr/bin/caller-kernel"' /usr/share/jupyter/kernels/caller/kernel.json ||
    fail "the kernelspec does not name /usr/bin/caller-kernel"

dpkg -r libcaller-dev >"$tmp/dpkg-r.log" 2>&1 || { cat "$tmp/dpkg-r.log" >&2; fail "dpkg -r failed"; }
installed=0
[[ ! -e /usr/lib/libcaller.so.0.1 && ! -e /usr/include/caller.h && ! -e /usr/include/caller_config.h ]] ||
    fail "dpkg -r left files"
echo "package-test: ok"
