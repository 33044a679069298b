"""Only here to list the packages: pyproject.toml's ``packages.find`` cannot add ``lowbit_amp.configs``, which maps the
top-level ``configs/`` folder into the package (see ``[tool.setuptools.package-dir]``). Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["lowbit_amp", "lowbit_amp.*"]) + ["lowbit_amp.configs"])
