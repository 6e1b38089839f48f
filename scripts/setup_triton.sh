#!/usr/bin/env bash
# Create the Triton server's own virtual environment from serving/triton/requirements.lock.
#
# nvidia-pytriton ships the tritonserver 2.51 binary, its libraries and the python backend (with one
# backend stub per Python version); onnxruntime runs the exported rankers inside that backend. It
# pins numpy<2, so it cannot share the project's venv (numpy 2).
#
# Idempotent and fast when already installed: a venv whose (lock, interpreter) hash matches is
# reused (~0.1 s). Prints the venv path on its last line. serving/triton/install.py computes the
# same path (or reads $HOME_MIXER_TRITON_VENV) and reads $VENV/triton/install.json written here.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=serving/triton/requirements.lock
PY=${PYTHON:-python3.11}
hash=$( (cat "$LOCK"; $PY --version) | sha256sum | cut -c1-12)
VENV=${HOME_MIXER_TRITON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/home-mixer/triton-venv-$hash}

if [ -f "$VENV/.complete" ]; then
  echo "$VENV"
  exit 0
fi

echo "[setup_triton] creating $VENV (nvidia-pytriton + onnxruntime, ~1 min the first time)" >&2
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
$PY -m venv "$VENV"
"$VENV/bin/pip" install -q --no-deps -r "$LOCK" >&2

# The python backend stub embeds the interpreter: it links libpython3.X.so from the interpreter's
# LIBDIR, which must come first on LD_LIBRARY_PATH (else the loader finds Debian's libpython and the
# stub fails). A static-only Python build (no libpython3.X.so) cannot host the stub.
pyver=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
libdir=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
dist="$site/pytriton/tritonserver"
libs="$site/nvidia_pytriton.libs"
if [ ! -e "$libdir/libpython$pyver.so.1.0" ]; then
  echo "[setup_triton] $libdir has no libpython$pyver.so.1.0: build Python with --enable-shared" \
       "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared) or set PYTHON to one that has it" >&2
  exit 1
fi
stub="$dist/python_backend_stubs/$pyver/triton_python_backend_stub"
if [ ! -x "$dist/bin/tritonserver" ] || [ ! -f "$stub" ]; then
  echo "[setup_triton] nvidia-pytriton has no tritonserver binary or no stub for Python $pyver in $dist" >&2
  exit 1
fi

# A backend folder as Triton expects it: backends/python/{libtriton_python.so, utils, stub}, with
# the stub for this venv's Python version (what pytriton itself assembles at run time).
backends="$VENV/triton/backends"
mkdir -p "$backends/python"
cp "$dist/backends/python/libtriton_python.so" "$dist/backends/python/triton_python_backend_utils.py" "$backends/python/"
cp "$stub" "$backends/python/triton_python_backend_stub"
chmod +x "$backends/python/triton_python_backend_stub"

ld_path="$libdir:$libs"
missing=$(LD_LIBRARY_PATH="$ld_path" ldd "$backends/python/triton_python_backend_stub" "$dist/bin/tritonserver" | grep "not found" || true)
if [ -n "$missing" ]; then
  echo "[setup_triton] unresolved libraries:" >&2
  echo "$missing" >&2
  exit 1
fi
if ! LD_LIBRARY_PATH="$ld_path" ldd "$backends/python/triton_python_backend_stub" | grep -q "$libdir/libpython$pyver"; then
  echo "[setup_triton] the stub does not load libpython from $libdir" >&2
  exit 1
fi
PATH="$VENV/bin:$PATH" LD_LIBRARY_PATH="$ld_path" "$VENV/bin/python" -c 'import numpy, onnxruntime' >&2

# What serving/triton/install.py needs to launch the server (paths only; no secrets).
cat > "$VENV/triton/install.json" <<EOF
{
  "venv": "$VENV",
  "python_version": "$pyver",
  "tritonserver": "$dist/bin/tritonserver",
  "backend_directory": "$backends",
  "ld_library_path": ["$libdir", "$libs"],
  "path": ["$VENV/bin"]
}
EOF
touch "$VENV/.complete"
echo "$VENV"
