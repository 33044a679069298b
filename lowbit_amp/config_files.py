"""Find the shipped YAML configs, in a source checkout and in an installed wheel alike.

The YAML files live in the repository's top-level ``configs/`` (where users read and copy them); the wheel ships the
same files as ``lowbit_amp/configs/`` (see pyproject.toml). So ``opt_level="configs/O2_per_module.yaml"`` works from the
repository root, and :func:`locate_config` makes the same string work from anywhere once the package is installed.
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["available_configs", "config_dirs", "locate_config", "packaged_config"]

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def config_dirs() -> list[pathlib.Path]:
    """Folders that hold the shipped configs, most specific first: inside the installed package, then the
    checkout's top-level ``configs/`` (a source tree or an editable install)."""
    candidates = [_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs"]
    return [path for path in candidates if path.is_dir()]


def available_configs() -> list[str]:
    """Names (file stems) of the shipped configs, e.g. ``['O0', 'O1', ..., 'O2_per_module']``."""
    names = {path.stem for folder in config_dirs() for path in folder.glob("*.yaml")}
    return sorted(names)


def packaged_config(name: str) -> pathlib.Path:
    """The path of a shipped config by name (``"O2_per_module"`` or ``"O2_per_module.yaml"``)."""
    filename = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    for folder in config_dirs():
        path = folder / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"No shipped config named {name!r}; the shipped configs are {available_configs()} "
        f"(searched {[str(d) for d in config_dirs()] or 'no configs folder found'})."
    )


def locate_config(path: str | os.PathLike) -> str | os.PathLike:
    """``path`` if it exists; else the shipped config of the same file name when ``path`` is a bare file name or sits
    in a folder called ``configs`` (``"configs/O2.yaml"`` from outside the checkout); else ``path`` unchanged, so the
    loader reports the missing file."""
    if os.path.exists(path):
        return path
    parts = pathlib.PurePath(os.fspath(path)).parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs"):
        try:
            return packaged_config(parts[-1])
        except FileNotFoundError:
            return path
    return path
