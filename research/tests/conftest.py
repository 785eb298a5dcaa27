"""The research and benchmark scripts' tests share the package tests' fixtures and helpers."""

from tests.conftest import *  # noqa: F401,F403
