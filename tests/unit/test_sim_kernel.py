"""The simulator's kernel (sim.kernel.FakeKernelMemory): Linux's answers, refusals on demand."""

from __future__ import annotations

import errno
import random

import pytest

from vmem_guest.blocks import Zone
from vmem_guest.errors import KernelError, OfflineRefused
from vmem_guest.hotplug import KernelBlock, KernelBlockState
from vmem_guest.sim.kernel import FakeKernelMemory

MiB = 1 << 20
MB = 128 * MiB


def test_fake_probe_online_offline_cycle() -> None:
    kernel = FakeKernelMemory(MB, node=1)
    assert kernel.block_size() == MB
    assert kernel.block(32).state is KernelBlockState.ABSENT
    assert kernel.probe(32 * MB) is True
    assert kernel.block(32) == KernelBlock(32, KernelBlockState.OFFLINE, Zone.NONE, 1)
    assert kernel.probe(32 * MB) is False
    assert kernel.probes == [32 * MB]
    kernel.online(32, Zone.KERNEL)
    assert kernel.block(32) == KernelBlock(32, KernelBlockState.ONLINE, Zone.KERNEL, 1)
    kernel.offline(32)
    assert kernel.block(32) == KernelBlock(32, KernelBlockState.OFFLINE, Zone.NONE, 1)


def test_fake_online_auto_lands_in_a_real_zone() -> None:
    kernel = FakeKernelMemory(MB)
    kernel.probe(0)
    kernel.online(0, Zone.AUTO)
    assert kernel.block(0).zone is Zone.MOVABLE


def test_fake_probe_misaligned() -> None:
    with pytest.raises(KernelError) as info:
        FakeKernelMemory(MB).probe(MB // 2)
    assert info.value.errno == errno.EINVAL


def test_fake_refuses_what_linux_refuses() -> None:
    kernel = FakeKernelMemory(MB)
    for call in (lambda: kernel.online(3, Zone.MOVABLE), lambda: kernel.offline(3)):
        with pytest.raises(KernelError) as info:
            call()
        assert info.value.errno == errno.ENOENT
    kernel.probe(3 * MB)
    # Linux state_store: device_offline() of an offline block returns 1 -> EINVAL.
    with pytest.raises(KernelError) as info:
        kernel.offline(3)
    assert info.value.errno == errno.EINVAL
    assert not isinstance(info.value, OfflineRefused)
    kernel.online(3, Zone.MOVABLE)
    with pytest.raises(KernelError) as info:
        kernel.online(3, Zone.MOVABLE)
    assert info.value.errno == errno.EINVAL


def test_fake_refuse_offline_set() -> None:
    kernel = FakeKernelMemory(MB)
    for index in (1, 2):
        kernel.probe(index * MB)
        kernel.online(index, Zone.MOVABLE)
    kernel.refuse_offline.add(1)
    with pytest.raises(OfflineRefused) as info:
        kernel.offline(1)
    assert (info.value.block, info.value.errno) == (1, errno.EBUSY)
    assert kernel.block(1).state is KernelBlockState.ONLINE
    assert kernel.offline_refusals == 1
    kernel.offline(2)
    assert kernel.block(2).state is KernelBlockState.OFFLINE
    kernel.refuse_offline.discard(1)
    kernel.offline(1)
    assert kernel.block(1).state is KernelBlockState.OFFLINE
    assert kernel.offline_refusals == 1


def _offline_outcomes(seed: int, rate: float, tries: int = 200) -> list[bool]:
    kernel = FakeKernelMemory(MB, offline_fail_rate=rate, rng=random.Random(seed))
    kernel.probe(0)
    outcomes = []
    for _ in range(tries):
        if kernel.block(0).state is KernelBlockState.OFFLINE:
            kernel.online(0, Zone.MOVABLE)
        try:
            kernel.offline(0)
        except OfflineRefused:
            outcomes.append(False)
        else:
            outcomes.append(True)
    assert kernel.offline_refusals == outcomes.count(False)
    return outcomes


def test_fake_offline_fail_rate_is_seeded() -> None:
    first = _offline_outcomes(7, 0.3)
    assert first == _offline_outcomes(7, 0.3)
    assert first != _offline_outcomes(8, 0.3)
    refused = first.count(False)
    assert 30 <= refused <= 90  # about 60 of 200
    assert all(_offline_outcomes(1, 0.0))
    assert not any(_offline_outcomes(1, 1.0))


@pytest.mark.parametrize(
    ("policy", "state", "zone"),
    [
        ("offline", KernelBlockState.OFFLINE, Zone.NONE),
        ("online", KernelBlockState.ONLINE, Zone.MOVABLE),
        ("online_movable", KernelBlockState.ONLINE, Zone.MOVABLE),
        ("online_kernel", KernelBlockState.ONLINE, Zone.KERNEL),
    ],
)
def test_fake_auto_online(policy: str, state: KernelBlockState, zone: Zone) -> None:
    kernel = FakeKernelMemory(MB, auto_online=policy)
    assert kernel.auto_online_blocks() == policy
    kernel.probe(5 * MB)
    assert (kernel.block(5).state, kernel.block(5).zone) == (state, zone)


def test_fake_reboot_forgets_hotplugged_blocks() -> None:
    kernel = FakeKernelMemory(MB)
    kernel.probe(0)
    kernel.probe(MB)
    kernel.online(1, Zone.MOVABLE)
    kernel.refuse_offline.add(1)
    kernel.reboot()
    assert kernel.block(0).state is KernelBlockState.ABSENT
    assert kernel.block(1).state is KernelBlockState.ABSENT
    assert kernel.refuse_offline == set()
    assert kernel.probe(MB) is True
