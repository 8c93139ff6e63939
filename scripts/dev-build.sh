#!/usr/bin/env bash
# Incremental development build: compiles safeshape._C into python/safeshape/ (use with PYTHONPATH=python).
# Usage: scripts/dev-build.sh [extra cmake -D options]; PYTHON selects the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BUILD=${SAFESHAPE_BUILD_DIR:-build/dev}
CMAKE=$("$PY" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))" 2>/dev/null || echo cmake)
if [ ! -f "$BUILD/build.ninja" ]; then
  "$CMAKE" -S . -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$("$PY" -c 'import ninja,os;print(os.path.join(ninja.BIN_DIR,"ninja"))')" \
    -DPython_EXECUTABLE="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" -DSAFESHAPE_INPLACE=ON "$@"
fi
"$CMAKE" --build "$BUILD" -j "${JOBS:-2}"
