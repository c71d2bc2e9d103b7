#!/usr/bin/env bash
# Installs the build into a temporary prefix and builds a small program
# outside the tree against it, as a user would, every way the README shows:
#
#   - pkg-config, shared: `cc prog.c $(pkg-config --cflags --libs caller)`;
#   - pkg-config, static: `cc prog.c $(pkg-config --static --cflags --libs
#     caller)` in a prefix installed with `--component devel` (no
#     libcaller.so there, so -lcaller is libcaller.a);
#   - CMake, find_package(caller): caller::caller and caller::caller_static,
#     and caller::caller_static alone in the static-only prefix.
#
# Runs each and checks its output; the shared ones must load the installed
# library by its SONAME, the static ones must not load libcaller at all.
# The program only includes caller.h: the build's options come from the
# installed caller_config.h, not from compiler flags.
#
#   install-test.sh <build dir> <cmake> <cc> [sanitizer flags...]
#
# In a sanitizer build the installed library is sanitized too, so the
# programs are compiled and linked with the same flags (passed by CMake).
set -euo pipefail

build=$(cd "$1" && pwd)
cmake=$2
cc=$3
shift 3
san=("$@")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix

fail() {
    echo "install-test: $*" >&2
    exit 1
}

echo "install-test: cmake --install $build --prefix $prefix"
"$cmake" --install "$build" --prefix "$prefix" >"$tmp/install.log" ||
    { cat "$tmp/install.log" >&2; fail "cmake --install failed"; }
cp "$build/install_manifest.txt" "$tmp/manifest.txt" # for the uninstall at the end

# What must be there. The library directory is lib/ or lib/<multiarch>/,
# depending on how the build was configured: find it from caller.pc.
pc=$(find "$prefix" -name caller.pc -path '*/pkgconfig/*' | head -n1)
[[ -n $pc ]] || fail "no caller.pc installed"
libdir=$(dirname "$(dirname "$pc")")
[[ -f $prefix/include/caller.h ]] || fail "no include/caller.h"
[[ -f $prefix/include/caller_config.h ]] || fail "no include/caller_config.h"
grep -Eq '^#define CALLER_WITH_ZMQ [01]$' "$prefix/include/caller_config.h" ||
    fail "include/caller_config.h does not define CALLER_WITH_ZMQ as 0 or 1"
for f in libcaller.a libcaller.so libcaller.so.0.1 "$(basename "$(readlink -f "$libdir/libcaller.so")")"; do
    [[ -e $libdir/$f ]] || fail "no $libdir/$f"
done
[[ $(readlink "$libdir/libcaller.so") == libcaller.so.0.1 ]] || fail "libcaller.so is not a link to libcaller.so.0.1"
# While 0.x, a minor version may break the ABI: the SONAME carries it.
soname=$(objdump -p "$libdir/libcaller.so" | awk '$1 == "SONAME" { print $2 }')
[[ $soname == libcaller.so.0.1 ]] || fail "SONAME is '$soname', expected libcaller.so.0.1"
[[ -f $libdir/cmake/caller/callerConfig.cmake ]] || fail "no CMake package config"

# caller.pc hands programs the include directory and libcaller's own link
# needs only: no -D flags (those are in caller_config.h) and nothing of
# ZeroMQ's but -lzmq for a static link (libzmq's --static chain is broken on
# Debian 12: it ends in a bare libprotokit.a).
export PKG_CONFIG_PATH=$libdir/pkgconfig
for args in "--cflags" "--static --cflags"; do
    out=$(pkg-config $args caller) || fail "pkg-config $args caller failed"
    [[ $out != *-D* ]] || fail "pkg-config $args caller gives -D flags: $out"
    read -ra words <<<"$out"
    [[ ${#words[@]} -eq 1 && ${words[0]} == -I* &&
        $(cd "${words[0]#-I}" && pwd -P) == $(cd "$prefix/include" && pwd -P) ]] ||
        fail "pkg-config $args caller gives '$out', expected only -I<prefix>/include"
done
out=$(pkg-config --static --libs caller) || fail "pkg-config --static --libs caller failed"
for word in $out; do
    [[ $word == -* ]] || fail "pkg-config --static --libs caller gives '$word' (not a flag): $out"
done

mkdir "$tmp/app"
cat >"$tmp/app/prog.c" <<'EOF'
/* A user's first program: a Caller on a new thread runs a call. */
#include <caller.h>
#include <stdint.h>
#include <stdio.h>

#if !defined(CALLER_WITH_ZMQ) || (CALLER_WITH_ZMQ != 0 && CALLER_WITH_ZMQ != 1)
#error "caller.h did not define CALLER_WITH_ZMQ as 0 or 1 (caller_config.h)"
#endif

static void *twice(void *arg) /* runs in the new thread */
{
    return (void *)((uintptr_t)arg * 2);
}

int main(void)
{
    /* caller_config.h says how the library was built: it must agree. */
    if (caller_wait_zmq(NULL, CALLER_READABLE, 0) != (CALLER_WITH_ZMQ ? -EINVAL : -ENOTSUP)) {
        fprintf(stderr, "CALLER_WITH_ZMQ is %d, the library disagrees\n", CALLER_WITH_ZMQ);
        return 1;
    }
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "installed"});
    if (!c)
        return 1;
    caller_pending_t *p = caller_call_soon(c, twice, (void *)21);
    void *v = NULL;
    int rc = caller_pending_wait(p, 10.0, CALLER_WAIT_RESULT, &v);
    /* The other convenience macros resolve to exported functions too. */
    caller_pending_t *w = caller_to_thread(c, twice, (void *)1);
    caller_pending_t *q = caller_queue_call(c, twice, (void *)2);
    caller_pending_t *l = caller_call_later(c, 0.001, twice, (void *)3);
    if (!w || !q || !l || caller_pending_wait(w, 10.0, 0, NULL) != 0 ||
        caller_pending_wait(l, 10.0, 0, NULL) != 0)
        rc = 1;
    caller_queue_close(c, twice);
    caller_pending_unref(w);
    caller_pending_unref(q);
    caller_pending_unref(l);
    printf("%s says %lu\n", caller_name(c), (unsigned long)(uintptr_t)v);
    caller_pending_unref(p);
    caller_stop(c, 0);
    if (rc == 0)
        rc = caller_wait_stopped(c, 10.0);
    caller_unref(c);
    return rc != 0;
}
EOF

cat >"$tmp/app/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.25)
project(app C)
find_package(caller 0.1 REQUIRED)
if(NOT APP_STATIC_ONLY)
  add_executable(prog-shared prog.c)
  target_link_libraries(prog-shared PRIVATE caller::caller)
elseif(TARGET caller::caller)
  message(FATAL_ERROR "caller::caller is defined, but this prefix has no shared library")
endif()
add_executable(prog-static prog.c)
target_link_libraries(prog-static PRIVATE caller::caller_static)
EOF

# Runs a program and checks what it printed; the shared ones must load the
# installed libcaller.so.0.1, the static ones no libcaller at all.
check_run() {
    local prog=$1 shared=$2 out loads
    loads=$(LD_LIBRARY_PATH=$libdir ldd "$prog" | grep 'libcaller' || true)
    if [[ $shared == shared ]]; then
        [[ $loads == *"libcaller.so.0.1 => $libdir/libcaller.so.0.1 "* ]] ||
            fail "$prog does not load $libdir/libcaller.so.0.1: $loads"
    else
        [[ -z $loads ]] || fail "$prog is linked statically but loads: $loads"
    fi
    out=$(LD_LIBRARY_PATH=$libdir "$prog") || fail "$prog failed (status $?), printed: $out"
    [[ $out == "installed says 42" ]] || fail "$prog printed '$out'"
    echo "install-test: $(basename "$prog"): $out"
}

# Builds prog.c with pkg-config's flags for the caller.pc in $1/pkgconfig
# (the rest of the arguments are pkg-config's options) into $2.
build_pkgconfig() {
    local pcdir=$1 out=$2 flags
    shift 2
    flags=$(PKG_CONFIG_PATH=$pcdir pkg-config "$@" --cflags --libs caller) ||
        fail "pkg-config $* --cflags --libs caller failed"
    echo "install-test: cc prog.c \$(pkg-config $* --cflags --libs caller) = $flags ${san[*]}"
    (cd "$tmp/app" && "$cc" -Wall -Werror "${san[@]}" prog.c $flags -o "$out") ||
        fail "building with pkg-config $* failed"
}

# Configures and builds the CMake project against prefix $1 in $2; the rest
# of the arguments are -D options for it.
build_cmake() {
    local pfx=$1 dir=$2
    shift 2
    echo "install-test: cmake -DCMAKE_PREFIX_PATH=$pfx $*"
    "$cmake" -S "$tmp/app" -B "$dir" -DCMAKE_PREFIX_PATH="$pfx" "$@" \
        -DCMAKE_C_COMPILER="$cc" -DCMAKE_C_FLAGS="${san[*]}" \
        -DCMAKE_EXE_LINKER_FLAGS="${san[*]}" >"$tmp/cmake.log" 2>&1 ||
        { cat "$tmp/cmake.log" >&2; fail "configuring the CMake project failed"; }
    "$cmake" --build "$dir" >"$tmp/build.log" 2>&1 ||
        { cat "$tmp/build.log" >&2; fail "building the CMake project failed"; }
}

# 1. pkg-config, shared, as the README shows.
build_pkgconfig "$libdir/pkgconfig" prog-pkgconfig
check_run "$tmp/app/prog-pkgconfig" shared

# 2. CMake: find_package(caller), caller::caller and caller::caller_static.
build_cmake "$prefix" "$tmp/app/build"
check_run "$tmp/app/build/prog-shared" shared
check_run "$tmp/app/build/prog-static" static

# The gdb script: where the README says to `source` it, and as the shared
# library's auto-load script, which gdb (where there is one) loads with it.
[[ -f $prefix/share/libcaller/gdb/caller-gdb.py ]] || fail "no share/libcaller/gdb/caller-gdb.py"
autoload=$prefix/share/gdb/auto-load$libdir/$(basename "$(readlink -f "$libdir/libcaller.so")")-gdb.py
[[ -f $autoload ]] || fail "no gdb auto-load script $autoload"
if command -v gdb >/dev/null 2>&1; then
    LD_LIBRARY_PATH=$libdir gdb -nx -batch \
        -iex "add-auto-load-scripts-directory $prefix/share/gdb/auto-load" \
        -iex "add-auto-load-safe-path $prefix" \
        -ex start -ex "info auto-load python-scripts" -ex "help info callers" -ex kill \
        "$tmp/app/build/prog-shared" >"$tmp/gdb.log" 2>&1 || true
    grep -q "^Yes .*libcaller\.so\..*-gdb\.py" "$tmp/gdb.log" && grep -q "^List the live Callers" "$tmp/gdb.log" ||
        { cat "$tmp/gdb.log" >&2; fail "gdb did not auto-load the installed gdb script"; }
    echo "install-test: gdb auto-loads $autoload"
else
    echo "install-test: no gdb: its auto-load of the script not checked"
fi

# 3. Static only: `--component devel` installs everything but the shared
# library, so -lcaller is libcaller.a and `pkg-config --static` must add all
# it needs; find_package then gives caller::caller_static alone.
sprefix=$tmp/static-prefix
echo "install-test: cmake --install $build --prefix $sprefix --component devel"
"$cmake" --install "$build" --prefix "$sprefix" --component devel >"$tmp/install-static.log" ||
    { cat "$tmp/install-static.log" >&2; fail "cmake --install --component devel failed"; }
slibdir=$sprefix/${libdir#"$prefix"/}
[[ -f $slibdir/libcaller.a && -f $sprefix/include/caller_config.h ]] ||
    fail "--component devel did not install libcaller.a and caller_config.h"
left=$(find "$sprefix" -name 'libcaller.so*' -o -name 'callerSharedTargets*')
[[ -z $left ]] || fail "--component devel installed the shared library: $left"
build_pkgconfig "$slibdir/pkgconfig" prog-pkgconfig-static --static
check_run "$tmp/app/prog-pkgconfig-static" static
build_cmake "$sprefix" "$tmp/app/build-static" -DAPP_STATIC_ONLY=ON
check_run "$tmp/app/build-static/prog-static" static
[[ ! -e $tmp/app/build-static/prog-shared ]] || fail "caller::caller exists in a static-only prefix"

# 4. Uninstall: cmake/uninstall.cmake with the install's list leaves no
# file or link under the prefix (the kernelspec included).
src=$(cd "$(dirname "$0")/.." && pwd)
"$cmake" -DMANIFEST="$tmp/manifest.txt" -P "$src/cmake/uninstall.cmake" >"$tmp/uninstall.log" ||
    { cat "$tmp/uninstall.log" >&2; fail "uninstall failed"; }
left=$(find "$prefix" \( -type f -o -type l \) | head -n5)
[[ -z $left ]] || fail "uninstall left files: $left"
echo "install-test: uninstall left no files"

echo "install-test: ok"
