"""The hypothesis run, :func:`fuzz`: differential fuzzing of a device against the model.

Hypothesis draws sequences (:mod:`~vmem_guest.conformance.strategies`), the
:class:`~vmem_guest.conformance.checker.Checker` runs each on the device and a
fresh model, and a Mismatch is shrunk to a minimal sequence. A DeviceLost
ends the run at once, unshrunk. The spec oracle's findings are shortened after
the run (:mod:`~vmem_guest.conformance.spec_shrink`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky

from vmem_guest.conformance.checker import Checker, Resize
from vmem_guest.conformance.compare import config_fields
from vmem_guest.conformance.findings import DeviceLost, Mismatch
from vmem_guest.conformance.kinds import Action
from vmem_guest.conformance.result import FuzzResult
from vmem_guest.conformance.saved import save_example
from vmem_guest.conformance.spec_shrink import shrink_violations
from vmem_guest.conformance.strategies import sequence_strategy
from vmem_guest.device import RequestChannel
from vmem_guest.errors import UsageError
from vmem_guest.sim.device_model import USABLE_EXTENT_X86, DeviceModel
from vmem_guest.sim.profiles import DeviceProfile, profile_for_offer

#: Default number of hypothesis examples and the longest generated sequence.
DEFAULT_EXAMPLES = 100
DEFAULT_MAX_STEPS = 40


class _Lost(BaseException):
    """Carries a DeviceLost out through hypothesis, which takes any Exception for a
    failure to shrink: shrinking would keep sending requests to a device that
    cannot answer. Never escapes :func:`fuzz`."""

    def __init__(self, lost: DeviceLost) -> None:
        super().__init__(lost.reason)
        self.lost = lost


def fuzz(
    device: RequestChannel,
    *,
    examples: int = DEFAULT_EXAMPLES,
    seed: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    resize: Resize | None = None,
    usable_margin: int = USABLE_EXTENT_X86,
    database: Path | None = None,
    save_dir: Path | None = None,
    profile: DeviceProfile | None = None,
    offered_features: int | None = None,
    model_factory: Callable[..., DeviceModel] | None = None,
) -> FuzzResult:
    """Differential fuzzing of ``device`` against the model; see the package docstring.

    ``device`` must have nothing plugged (UsageError otherwise). ``seed``:
    hypothesis's seed (None: a random one, in the result). ``database``: a
    directory for hypothesis's example database (a saved failure is replayed
    first next time); ``save_dir``: where a failure is written as JSON.
    ``profile``: the QEMU whose rules the model follows (None: the one
    ``offered_features``, the device's feature word, points to; qemu-7.2 when that
    is unknown too); offered features the profile does not expect are reported as
    a mismatch. ``model_factory`` overrides the profile's model (tests' variants).
    """
    cfg = _empty_device_config(device)
    if profile is None:
        profile = profile_for_offer(offered_features or 0)
    checker = Checker(
        device,
        resize=resize,
        usable_margin=usable_margin,
        model_factory=model_factory or profile.model,
    )
    try:
        checker.new_model()
    except ValueError as exc:
        raise UsageError(f"the model cannot stand for this device: {exc}") from None
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    result = FuzzResult(
        seed=seed,
        max_examples=examples,
        counts=checker.counts,
        geometry=cfg,
        profile=profile.name,
        spec=checker.spec,
        oracle=checker.oracle,
    )
    if offered_features is not None:
        result.offered_features = offered_features
        result.feature_differences = profile.feature_differences(offered_features)
    _run(checker, result, max_steps=max_steps, database=database)
    if result.lost is None:
        try:
            shrink_violations(checker)
        except DeviceLost as exc:
            result.lost = exc
    if result.mismatches and save_dir is not None:
        result.saved = save_example(result, save_dir)
    return result


def _empty_device_config(device: RequestChannel) -> dict[str, int]:
    """The device's config fields; UsageError unless it has one and nothing is plugged
    (the fuzzer never unplugs memory it did not plug)."""
    cfg = config_fields(device.read_config())
    if not cfg:
        raise UsageError("the device's config space is shorter than 56 bytes")
    if cfg["plugged_size"]:
        raise UsageError(
            f"the device has {cfg['plugged_size']:#x} bytes plugged: the fuzzer starts only "
            "from an empty device (unplug it first, e.g. vmem-guest unplug-all)"
        )
    return cfg


def _run(checker: Checker, result: FuzzResult, *, max_steps: int, database: Path | None) -> None:
    """The hypothesis run; its failure, if any, goes into ``result``."""
    last_failure: list[Mismatch] = []

    @settings(
        max_examples=result.max_examples,
        deadline=None,
        database=DirectoryBasedExampleDatabase(str(database)) if database else None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        print_blob=False,
    )
    @given(sequence_strategy(max_steps, resizable=checker.resize is not None))
    def one_example(actions: list[Action]) -> None:
        try:
            checker.run_example(actions)
        except Mismatch as exc:
            last_failure[:] = [exc]
            raise
        except DeviceLost as exc:
            raise _Lost(exc) from exc

    try:
        checker.clean()  # usable_region_size as the current requested_size implies
        hypothesis_seed(result.seed)(one_example)()
    except Mismatch as exc:
        result.mismatch = exc
    except Flaky:
        # Failed once, then passed on replay: report the last failure seen.
        result.mismatch = last_failure[0] if last_failure else None
        result.flaky = True
    except DeviceLost as exc:  # the first clean-up, before hypothesis
        result.lost = exc
    except _Lost as carried:
        result.lost = carried.lost
