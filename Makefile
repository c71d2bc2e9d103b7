# Wraps CMake; CMakeLists.txt is the build. Every target that builds first
# runs scripts/ensure-deps.sh, which installs missing Debian packages as root.
#
#   make [build]       RelWithDebInfo build in build/
#   make test          ... and run CTest (ARGS='-R pending' to pick tests)
#   make test-asan     ASan+UBSan build in build-asan/, run CTest
#   make test-tsan     TSan build in build-tsan/, run CTest
#   make bench         Release build in build-release/, run bench/run.sh
#   make demo          run build/example-$(DEMO) $(DEMO_ARGS): the live demo
#                      (DEMO_ARGS='--seconds 10 --workers 20')
#   make docs          API reference from include/caller.h into build/docs/html
#                      (installs doxygen; fails on anything undocumented)
#   make install       install build/ into $(PREFIX) (with the man pages: docs first)
#   make uninstall     remove what the last `make install` installed
#   make package       a Debian package (CPack) in build/
#   make format, format-check, clean
#
# WERROR=OFF to build with warnings allowed (default ON).

WERROR ?= ON
PREFIX ?= /usr/local
DEMO ?= demo
DEMO_ARGS ?=
JOBS ?= 2
ARGS ?=

CMAKE_ARGS = -DCALLER_WERROR=$(WERROR)
# $(call ctest,<build dir>)
ctest = ctest --test-dir $(1) --output-on-failure -j$(JOBS) $(ARGS)

# cmake --build runs make inside make: keep its output free of
# "Entering directory" lines.
MAKEFLAGS += --no-print-directory

FORMAT_FILES = $(wildcard include/*.h src/*.c src/*.h tests/*.c tests/*.h bench/*.c examples/*.c kernel/*.c kernel/*.h)

.PHONY: soak fuzz build deps test test-asan test-tsan bench demo docs install uninstall package format format-check clean

build: deps
	cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_ARGS)
	cmake --build build -j$(JOBS)

deps:
	@bash scripts/ensure-deps.sh

test: build
	$(call ctest,build)

test-asan: deps
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCALLER_SANITIZE=asan $(CMAKE_ARGS)
	cmake --build build-asan -j$(JOBS)
	$(call ctest,build-asan)

# TSan's runtime refuses to start on kernels whose mmap ASLR uses more bits
# than it expects ("unexpected memory mapping"). The probe finds out; only
# then does CTest run with ASLR off for its children (setarch -R).
test-tsan: deps
	cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=Debug -DCALLER_SANITIZE=tsan $(CMAKE_ARGS)
	cmake --build build-tsan -j$(JOBS)
	@wrap=""; \
	if ! build-tsan/caller-tsan-probe >/dev/null 2>build-tsan/tsan-probe.log; then \
	    if grep -q "unexpected memory mapping" build-tsan/tsan-probe.log \
	       && setarch $$(uname -m) -R build-tsan/caller-tsan-probe >/dev/null 2>&1; then \
	        wrap="setarch $$(uname -m) -R"; \
	        echo "test-tsan: TSan cannot map its shadow with this kernel's ASLR; running CTest under '$$wrap'"; \
	    else \
	        echo "test-tsan: the TSan runtime does not start here:" >&2; \
	        cat build-tsan/tsan-probe.log >&2; \
	        exit 1; \
	    fi; \
	fi; \
	echo "$$wrap $(call ctest,build-tsan)"; \
	$$wrap $(call ctest,build-tsan)

# The Go peer of W4 needs Debian's golang-go; without it (not root, or no
# package source) its systems are shown as not run.
bench: deps
	@bash scripts/ensure-deps.sh golang-go || echo "bench: without Go, W4's Go peer is not run"
	cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release -DCALLER_BENCH=ON $(CMAKE_ARGS)
	cmake --build build-release -j$(JOBS)
	bash bench/run.sh build-release

# The libFuzzer harness (tests/fuzz-api.c) for FUZZ_SECONDS, built with clang
# under ASan+UBSan in build-fuzz/; any crash or broken invariant fails it.
FUZZ_SECONDS ?= 60
fuzz: deps
	@bash scripts/ensure-deps.sh clang libclang-rt-14-dev
	CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Debug -DCALLER_SANITIZE=asan \
	    -DCALLER_FUZZ=ON -DCALLER_BENCH=OFF -DCALLER_WERROR=OFF
	cmake --build build-fuzz -j$(JOBS) --target fuzz-api
	mkdir -p build-fuzz/corpus
	ASAN_OPTIONS=halt_on_error=1:detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1 \
	    build-fuzz/fuzz-api -max_total_time=$(FUZZ_SECONDS) -timeout=60 -rss_limit_mb=8192 \
	    -print_final_stats=1 -artifact_prefix=build-fuzz/ build-fuzz/corpus tests/fuzz-corpus

# Ten minutes of the load mix (SOAK_SECONDS to change), RSS and threads
# printed each minute; fails if they grew after the first minute.
soak: build
	build/soak

demo: build
	build/example-$(DEMO) $(DEMO_ARGS)

# Doxygen reads the header only; docs/Doxyfile makes every warning (an
# undocumented public symbol) fail the run.
CALLER_VERSION = $(shell sed -n 's/^project.caller VERSION \([0-9.]*\).*/\1/p' CMakeLists.txt)
docs:
	@bash scripts/ensure-deps.sh doxygen
	@mkdir -p build/docs
	CALLER_VERSION=$(CALLER_VERSION) doxygen docs/Doxyfile
	@test -f build/docs/html/md_docs_guide.html || { echo "docs: the guide (docs/guide.md) was not rendered"; exit 1; }
	@echo "docs: build/docs/html/index.html (the guide: build/docs/html/md_docs_guide.html)"

install: build docs
	cmake --install build --prefix $(PREFIX)
	cp build/install_manifest.txt build/make-install-manifest.txt

# A Debian package of what `make install` installs, under /usr, in build/.
package: build docs
	cd build && cpack -G DEB

# Remove what the last `make install` put in place (its list of files).
uninstall:
	cmake -DMANIFEST=build/make-install-manifest.txt -P cmake/uninstall.cmake

format:
	@bash scripts/ensure-deps.sh clang-format
	$(if $(FORMAT_FILES),clang-format -i $(FORMAT_FILES),@echo "format: no files")

format-check:
	@bash scripts/ensure-deps.sh clang-format
	$(if $(FORMAT_FILES),clang-format --dry-run --Werror $(FORMAT_FILES),@echo "format-check: no files")

clean:
	rm -rf build build-asan build-tsan build-release build-fuzz
