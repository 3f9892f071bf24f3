#!/usr/bin/env bash
# Builds the C core with its C tests twice, in a separate build directory:
# with AddressSanitizer + UndefinedBehaviorSanitizer (any report fails), and
# plain for valgrind memcheck (any definite leak or error fails).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${1:-$(mktemp -d)}"
mkdir -p "$build"
libdir="$(python -c 'import scipy_openblas32 as s; print(s.get_lib_dir())')"
lib="$(python -c 'import scipy_openblas32 as s; print(s.get_library())')"
sources=$(ls "$root"/csrc/*.c | grep -v _core.c)
common=(-std=c11 -fopenmp -I"$root/csrc" -DADA_BLAS_PREFIX_SCIPY=1 "$here/test_core.c" $sources
        -L"$libdir" -l"$lib" -Wl,-rpath,"$libdir" -lm)
gcc -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    "${common[@]}" -o "$build/test_core_asan"
gcc -O2 -g "${common[@]}" -o "$build/test_core"
echo "== ASan + UBSan"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 OMP_NUM_THREADS=2 "$build/test_core_asan"
echo "== valgrind memcheck"
if command -v valgrind >/dev/null; then
    OMP_NUM_THREADS=1 valgrind --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite \
        --suppressions="$here/valgrind.supp" \
        --quiet "$build/test_core"
else
    echo "valgrind not installed" >&2
    exit 4
fi
