"""Hypothesis profiles for tests/fuzz, chosen by ``VMEM_FUZZ_PROFILE``.

- ``ci`` (default, inside ``make test``): bounded, a few seconds per machine. It is
  hypothesis's own ``ci`` profile (derandomized, no example database, and
  ``print_blob``: a failure prints the ``@reproduce_failure`` line that replays it)
  with our sizes on top, so a failure in a CI log is reproducible from the log.
- ``deep`` (``make fuzz``): thousands of examples, longer runs, random and with the
  example database.

``tests/fuzz/conftest.py`` calls :func:`load_profile`, so every hypothesis test
under tests/fuzz uses the profile with nothing to import.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "VMEM_FUZZ_PROFILE"
DEFAULT_PROFILE = "ci"
PROFILES: dict[str, dict[str, object]] = {
    "ci": {"max_examples": 150, "stateful_step_count": 40},
    "deep": {"max_examples": 5000, "stateful_step_count": 100},
}


#: Hypothesis's own profile each of ours is built on ("default" when it has none).
PARENTS = {"ci": "ci", "deep": "default"}


def load_profile() -> str:
    """Register both profiles and load the selected one; return its name."""
    for name, values in PROFILES.items():
        settings.register_profile(
            name,
            settings.get_profile(PARENTS[name]),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            **values,  # type: ignore[arg-type]
        )
    name = os.environ.get(PROFILE_ENV, DEFAULT_PROFILE)
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r}: expected one of {sorted(PROFILES)}")
    settings.load_profile(name)
    return name
