"""The one-way layers of DESIGN.md, as the import-linter contract in pyproject.toml states them."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint(config: Path, cwd: Path) -> int:
    from importlinter.cli import lint_imports

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return lint_imports(config_filename=str(config), no_cache=True)
    finally:
        os.chdir(old)


def test_layers_contract_is_kept():
    """No module imports from a layer above its own (ground -> ... -> CLI/demo)."""
    assert _lint(ROOT / "pyproject.toml", ROOT) == 0, "an import breaks the layers: see the report above"


def test_contract_catches_an_upward_import(tmp_path, monkeypatch, capsys):
    """The same contract over a copy of two layers fails when the ground imports the mixer."""
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    pkgs = contract["root_packages"]
    for pkg in pkgs:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "core" / "bad.py").write_text("import mixer\n")
    layers = ", ".join(f'"{layer}"' for layer in contract["contracts"][0]["layers"])
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text(
        f"[tool.importlinter]\nroot_packages = {pkgs!r}\n".replace("'", '"')
        + f'[[tool.importlinter.contracts]]\nname = "layers"\ntype = "layers"\nlayers = [{layers}]\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for pkg in pkgs:  # the copies, not the installed packages
        monkeypatch.delitem(__import__("sys").modules, pkg, raising=False)
    assert _lint(cfg, tmp_path) == 1
    assert "core.bad -> mixer" in capsys.readouterr().out

