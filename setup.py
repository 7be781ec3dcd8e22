"""Only the licence is here (see pyproject.toml); everything else is in pyproject.toml."""

from setuptools import setup

setup(license="Apache-2.0")
