"""The hypothesis profiles of tests/fuzz (settings.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from .settings import DEFAULT_PROFILE, PROFILE_ENV, PROFILES, load_profile


@pytest.fixture
def restore_profile() -> Iterator[None]:
    yield
    load_profile()  # what the session runs with (VMEM_FUZZ_PROFILE as given)


@pytest.mark.usefixtures("restore_profile")
def test_the_ci_profile_prints_the_blob_and_stays_reproducible(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure in a CI log carries the line that replays it (print_blob), and the
    run is hypothesis's derandomized one, so the same commit finds the same failure."""
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert load_profile() == DEFAULT_PROFILE == "ci"
    current = settings()
    assert current.print_blob is True
    assert current.derandomize is True
    assert current.database is None
    assert current.max_examples == PROFILES["ci"]["max_examples"]
    assert current.stateful_step_count == PROFILES["ci"]["stateful_step_count"]
    assert current.deadline is None


@pytest.mark.usefixtures("restore_profile")
def test_the_deep_profile_draws_anew_and_keeps_its_examples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PROFILE_ENV, "deep")
    assert load_profile() == "deep"
    current = settings()
    assert current.derandomize is False
    assert current.database is not None
    assert current.max_examples == PROFILES["deep"]["max_examples"]


def test_an_unknown_profile_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILE_ENV, "fast")
    with pytest.raises(ValueError, match="expected one of"):
        load_profile()
