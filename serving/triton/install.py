"""Where the Triton server is installed: the separate venv made by ``scripts/setup_triton.sh``.

The venv path is ``$HOME_MIXER_TRITON_VENV`` or
``${XDG_CACHE_HOME:-~/.cache}/home-mixer/triton-venv-<hash>``, ``<hash>`` = the first 12 hex digits
of ``sha256(requirements.lock + "Python X.Y.Z\\n")`` (the script hashes the lock and
``python3.11 --version``; the project's venv runs the same interpreter). The script writes
``<venv>/triton/install.json`` with the binary, backend folder and library paths, and
``<venv>/.complete`` when everything checked out.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from core.state import PROJECT_ROOT

LOCK_FILE = Path(__file__).resolve().parent / "requirements.lock"
SETUP_SCRIPT = PROJECT_ROOT / "scripts" / "setup_triton.sh"


class TritonNotInstalledError(RuntimeError):
    """The Triton venv is missing or incomplete; the message gives the command that installs it."""


def triton_venv_path(lock_file: Path = LOCK_FILE) -> Path:
    """The venv folder ``scripts/setup_triton.sh`` creates for this lock and interpreter."""
    override = os.environ.get("HOME_MIXER_TRITON_VENV")
    if override:
        return Path(override)
    digest = hashlib.sha256(lock_file.read_bytes() + f"Python {platform.python_version()}\n".encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "home-mixer" / f"triton-venv-{digest[:12]}"


@dataclass(frozen=True)
class TritonInstallation:
    """A checked Triton install.

    Attributes:
        venv: the venv folder (its ``bin`` goes first on ``PATH``: the python backend stub embeds
            Python and finds the venv's site-packages through the ``python3`` it finds there).
        tritonserver: the ``tritonserver`` 2.51 binary shipped inside ``nvidia-pytriton``.
        backend_directory: ``backends/python`` with the stub for the venv's Python version.
        ld_library_path: the interpreter's LIBDIR (first, or the stub loads Debian's libpython
            and fails) and pytriton's bundled libraries.
    """

    venv: Path
    tritonserver: Path
    backend_directory: Path
    ld_library_path: tuple[str, ...]
    path: tuple[str, ...]

    @classmethod
    def find(cls, venv: Path | None = None) -> "TritonInstallation":
        """The installation in ``venv`` (default :func:`triton_venv_path`).

        Raises:
            TritonNotInstalledError: not installed, or installed incompletely.
        """
        venv = Path(venv) if venv is not None else triton_venv_path()
        info_file = venv / "triton" / "install.json"
        if not (venv / ".complete").exists() or not info_file.exists():
            raise TritonNotInstalledError(
                f"the Triton server is not installed in {venv}: run `bash {SETUP_SCRIPT}` "
                "(creates its own venv with nvidia-pytriton and onnxruntime, about a minute)"
            )
        info = json.loads(info_file.read_text())
        inst = cls(
            venv=venv,
            tritonserver=Path(info["tritonserver"]),
            backend_directory=Path(info["backend_directory"]),
            ld_library_path=tuple(info["ld_library_path"]),
            path=tuple(info["path"]),
        )
        for p in (inst.tritonserver, inst.backend_directory / "python" / "triton_python_backend_stub"):
            if not p.exists():
                raise TritonNotInstalledError(f"{p} is missing: remove {venv} and run `bash {SETUP_SCRIPT}` again")
        return inst

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the server process: ``base`` (default ``os.environ``) with the install's
        ``LD_LIBRARY_PATH`` and ``PATH`` entries first, and MLflow/Feast variables removed."""
        env = dict(os.environ if base is None else base)
        env["LD_LIBRARY_PATH"] = ":".join([*self.ld_library_path, *filter(None, [env.get("LD_LIBRARY_PATH")])])
        env["PATH"] = ":".join([*self.path, *filter(None, [env.get("PATH")])])
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the project's venv must not leak in
            env.pop(var, None)
        return env
