""" Timing and memory helpers for benchmark scripts (``scripts/benchmark.py`` and others).

Method: every candidate runs one step in turn, round after round (interleaved), so that load
changes on a shared machine hit all candidates alike; warm-up rounds are discarded and the
median of the measured rounds is compared, as a ratio against a reference candidate.

    steps = {'dgmn2_tiny': lambda: model_a(x), 'pvt_v2_b1': lambda: model_b(x)}
    times = time_interleaved(steps, iters=10, warmup=2)
    med = medians(times)
    speed = ratios(med, 'pvt_v2_b1')           # reference time / time: > 1 is faster
    peak = peak_memory(lambda: model_a(x))     # bytes of tensor memory one call needs

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call;
on CPU the profiler's allocator events (``profile_memory=True``): every tensor allocation and
free of the call in order, whose running signed sum is the live tensor memory and whose
maximum is the peak (independent of the C allocator's caching, other threads and page-fault
timing, which process RSS would mix in).
"""
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import torch

__all__ = ['sync', 'time_interleaved', 'medians', 'ratios', 'peak_memory', 'quiet_native_stderr']


def sync(device: Optional[torch.device] = None):
    """ Wait for queued CUDA work (no-op on CPU). """
    if device is not None and torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(
        steps: Mapping[str, Callable[[], object]],
        iters: int,
        warmup: int = 1,
        device: Optional[torch.device] = None,
        on_step: Optional[Callable[[], None]] = None,
        clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, List[float]]:
    """ Seconds per call of every step, measured interleaved.

    Args:
        steps: name -> function of no arguments (one step: a forward pass, a train step...).
        iters: measured rounds; warmup: discarded rounds before them.
        device: synchronised around every call (CUDA).
        on_step: called after every call (e.g. a progress bar's update).
        clock: ``time.perf_counter`` (wall time) or ``time.process_time`` (CPU time of this
            process: with one thread, insensitive to other processes' load on a shared machine).

    Returns:
        name -> ``iters`` durations in seconds, in round order.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f'time_interleaved: need iters >= 1 and warmup >= 0, got {iters}, {warmup}')
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for it in range(warmup + iters):
        for name, fn in steps.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            if it >= warmup:
                times[name].append(clock() - t0)
            if on_step is not None:
                on_step()
    return times


def medians(times: Mapping[str, List[float]]) -> Dict[str, float]:
    """ name -> median duration. """
    return {name: statistics.median(t) for name, t in times.items()}


def ratios(median_times: Mapping[str, float], reference: str) -> Dict[str, float]:
    """ name -> reference time / time (speed relative to ``reference``; > 1 is faster). """
    if reference not in median_times:
        raise KeyError(f'ratios: reference {reference!r} is not among {list(median_times)}')
    return {name: median_times[reference] / t for name, t in median_times.items()}


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """ Silence what native code writes to file descriptor 2 (the profiler's ``USDT ...`` and
    device-probe lines) for the duration of the block; Python's ``sys.stderr`` is flushed first. """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (e.g. some embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, 'w') as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: Optional[torch.device] = None) -> float:
    """ Peak tensor memory in bytes that one call of ``fn`` needs (see the module doc). """
    device = torch.device('cpu' if device is None else device)
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile
    with quiet_native_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return float(peak)
