"""Fixtures for the fault tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _fresh_cli_logging():
    """`mmcl.cli.main` adds a stderr handler once per process; drop it so each test's capsys sees its own lines."""
    logger = logging.getLogger("mmcl")
    saved = list(logger.handlers)
    logger.handlers.clear()
    yield
    logger.handlers[:] = saved
