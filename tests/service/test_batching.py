"""worker.batching: concurrent sampling calls merge into one batch, and every caller gets its own images."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from diffusion.samplers import sample
from diffusion.schedules import NoiseSchedule, ScheduleConfig
from diffusion.unet import UNet, UNetConfig
from worker.batching import BatchingSampler, padded_size

from .service_testlib import wait_for

TINY = UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  dropout=0.0, num_classes=3)
KW = dict(sampler="dpmpp", steps=4, guidance=1.5)
# Matrix kernels block differently at different batch sizes: rows agree to float32 rounding, far
# below one 8-bit level of a written image (2 / 255 in [-1, 1]).
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(TINY).eval()


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(ScheduleConfig("linear", 1000))


class CountingSample:
    """diffusion.samplers.sample, counting the merged calls and their sizes; each call first sleeps ``delay``
    seconds, or waits until ``gate`` is set."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.sizes: list[int] = []
        self.delay, self.gate = delay, gate

    def __call__(self, *args, **kw):
        self.sizes.append(len(args[3]))
        if self.gate is not None:
            assert self.gate.wait(30)
        time.sleep(self.delay)
        return sample(*args, **kw)


def run_concurrently(fns):
    """Start every fn in its own thread at once; return their results (or exceptions) in order."""
    out = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i, fn):
        barrier.wait()
        try:
            out[i] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def requests(n_jobs: int, per_job: int):
    """(labels, seeds) of n_jobs jobs of per_job images each, every job with its own seeds."""
    return [(torch.arange(per_job) % 3, [1000 * j + i for i in range(per_job)]) for j in range(n_jobs)]


def test_concurrent_calls_share_one_batch_and_get_their_own_images(model, schedule):
    counting = CountingSample()
    batcher = BatchingSampler(max_batch=100, window=1.0, sample_fn=counting)  # all five arrive within it
    reqs = requests(5, 3)
    got = run_concurrently([lambda lb=lb, sd=sd: batcher(model, schedule, lb, sd, **KW) for lb, sd in reqs])
    assert counting.sizes == [15]  # five jobs, one merged call per step
    assert batcher.stats.batches == 1 and batcher.stats.requests == 5
    for (lb, sd), x in zip(reqs, got):
        alone = sample(model, schedule, lb, sd, **KW)
        torch.testing.assert_close(x, alone, atol=ATOL, rtol=0)  # the same image whichever batch it lands in


def test_max_batch_splits_and_different_settings_do_not_mix(model, schedule):
    counting = CountingSample()
    batcher = BatchingSampler(max_batch=6, window=1.0, sample_fn=counting)  # all five arrive within it
    reqs = requests(4, 3)
    other = dict(KW, guidance=1.0)
    calls = [lambda lb=lb, sd=sd: batcher(model, schedule, lb, sd, **KW) for lb, sd in reqs]
    calls.append(lambda: batcher(model, schedule, *reqs[0], **other))
    got = run_concurrently(calls)
    assert sorted(counting.sizes) == [3, 6, 6]  # 4 x 3 images in batches of <= 6; the guidance-1 call alone
    torch.testing.assert_close(got[-1], sample(model, schedule, *reqs[0], **other), atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], sample(model, schedule, *reqs[1], **KW), atol=ATOL, rtol=0)


def test_a_request_larger_than_max_batch_still_runs(model, schedule):
    batcher = BatchingSampler(max_batch=2, window=0.0)
    lb, sd = requests(1, 5)[0]
    torch.testing.assert_close(batcher(model, schedule, lb, sd, **KW), sample(model, schedule, lb, sd, **KW),
                               atol=ATOL, rtol=0)


class Canceled(Exception):
    pass


def test_one_canceled_caller_drops_out_and_the_others_finish(model, schedule):
    counting = CountingSample()
    batcher = BatchingSampler(window=0.3, sample_fn=counting)
    reqs = requests(3, 2)
    steps_seen = []

    def cancel_at_step_2(step, steps):
        steps_seen.append(step)
        if step >= 2:
            raise Canceled()

    calls = [lambda lb=lb, sd=sd: batcher(model, schedule, lb, sd, **KW) for lb, sd in reqs[:2]]
    calls.append(lambda: batcher(model, schedule, *reqs[2], progress=cancel_at_step_2, **KW))
    got = run_concurrently(calls)
    assert isinstance(got[2], Canceled)
    assert steps_seen == [1, 2]  # not called again once it raised
    assert counting.sizes == [6]
    torch.testing.assert_close(got[0], sample(model, schedule, *reqs[0], **KW), atol=ATOL, rtol=0)


def test_a_batch_whose_callers_all_dropped_out_stops_early(model, schedule):
    ended = threading.Event()

    def sample_then_flag(*args, **kw):
        try:
            return sample(*args, **kw)
        finally:
            ended.set()
    batcher = BatchingSampler(window=0.0, sample_fn=sample_then_flag)
    steps_seen = []

    def cancel_at_once(step, steps):
        steps_seen.append(step)
        raise Canceled()

    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(Canceled):
            batcher(model, schedule, *requests(1, 2)[0], progress=cancel_at_once, **dict(KW, steps=50))
        assert ended.wait(30)  # the engine's sampling call has returned
    finally:
        hook.remove()
    assert steps_seen == [1]
    assert len(calls) <= 2  # the batch stopped after its first step, not after 50 steps' model calls
    # the engine is still alive for the next caller
    lb, sd = requests(1, 2)[0]
    torch.testing.assert_close(batcher(model, schedule, lb, sd, **KW), sample(model, schedule, lb, sd, **KW),
                               atol=ATOL, rtol=0)


def test_a_failing_model_call_fails_every_caller_in_the_batch_with_its_error(schedule):
    def broken(*args, **kw):
        raise RuntimeError("out of memory")

    batcher = BatchingSampler(window=0.3, sample_fn=broken)
    got = run_concurrently([lambda lb=lb, sd=sd: batcher(None, schedule, lb, sd, **KW) for lb, sd in requests(2, 2)])
    assert all(isinstance(e, RuntimeError) and "out of memory" in str(e) for e in got)


def test_requests_arriving_during_a_batch_join_the_next_one(model, schedule):
    release = threading.Event()
    counting = CountingSample(gate=release)  # the first batch runs until all three others are queued
    batcher = BatchingSampler(window=0.0, sample_fn=counting)
    reqs = requests(4, 2)
    first = threading.Thread(target=batcher, args=(model, schedule, *reqs[0]), kwargs=KW)
    first.start()
    wait_for(lambda: counting.sizes, 10, "the first batch to run")
    got = [None] * 3

    def later(i: int) -> None:
        got[i] = batcher(model, schedule, *reqs[i + 1], **KW)

    threads = [threading.Thread(target=later, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(batcher._queue) == 3, 10, "three requests queued behind the first batch")
    finally:
        release.set()
    for t in [first, *threads]:
        t.join(30)
    assert counting.sizes == [2, 6]
    torch.testing.assert_close(got[2], sample(model, schedule, *reqs[3], **KW), atol=ATOL, rtol=0)


def test_a_request_waiting_its_turn_stops_when_its_check_raises(model, schedule):
    """A job queued behind other jobs' batches learns at once that it was canceled (or is out of time, or its
    worker is stopping), not when its turn comes; its rows never run."""
    release = threading.Event()
    counting = CountingSample(gate=release)  # the first batch runs until the test releases it
    batcher = BatchingSampler(window=0.0, max_batch=2, sample_fn=counting)
    reqs = requests(2, 2)
    first = threading.Thread(target=batcher, args=(model, schedule, *reqs[0]), kwargs=KW)
    first.start()
    wait_for(lambda: counting.sizes, 10, "the first batch to run")  # the second request waits behind it
    checks = []

    def check():
        checks.append(time.perf_counter())
        if len(checks) == 2:
            raise Canceled()

    try:
        with pytest.raises(Canceled):  # while the first batch still runs: it has not been released
            batcher(model, schedule, *reqs[1], check=check, **KW)
    finally:
        release.set()
    first.join(30)
    batcher(model, schedule, *requests(2, 2)[1], **KW)  # the next request runs alone:
    assert counting.sizes == [2, 2]  # the abandoned request never ran, neither by itself nor merged into it


def test_mismatched_labels_and_seeds_are_rejected(model, schedule):
    with pytest.raises(ValueError, match="2 labels but 3 seeds"):
        BatchingSampler()(model, schedule, torch.tensor([0, 1]), [1, 2, 3], **KW)


@pytest.mark.parametrize("n,max_batch,expected", [
    (1, 100, 1), (2, 100, 2), (3, 100, 4), (5, 100, 8), (64, 100, 64), (65, 100, 100), (100, 100, 100),
    (150, 100, 150), (7, 6, 7), (5, 6, 6)])
def test_padded_size_is_the_next_power_of_two_capped_at_max_batch(n, max_batch, expected):
    assert padded_size(n, max_batch) == expected


def test_padding_gives_the_model_few_shapes_and_callers_only_their_rows(model, schedule):
    counting = CountingSample()
    batcher = BatchingSampler(max_batch=12, window=0.0, sample_fn=counting, pad=True)
    for per_job in (1, 3, 5, 6, 7, 12):
        lb, sd = requests(1, per_job)[0]
        x = batcher(model, schedule, lb, sd, **KW)
        assert x.shape[0] == per_job
        if per_job in (3, 5):  # padded with copies of the last image: its own rows are unchanged
            torch.testing.assert_close(x, sample(model, schedule, lb, sd, **KW), atol=ATOL, rtol=0)
    assert counting.sizes == [1, 4, 8, 8, 8, 12]
    assert batcher.stats.padded == (4 - 3) + (8 - 5) + (8 - 6) + (8 - 7)
