"""Load the hypothesis profile (tests/fuzz/settings.py) for every fuzz test."""

from __future__ import annotations

from .settings import load_profile

load_profile()
