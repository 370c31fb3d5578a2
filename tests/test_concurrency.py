"""Ordered concurrent calls: order, laziness, side-by-side execution and per-thread torch threads."""

import threading
import time

import pytest
import torch

from piqa_core.concurrency import ordered_map, use_torch_threads


def test_results_come_back_in_input_order():

    def slow_first(i):
        time.sleep(0.05 if i % 3 == 0 else 0.0)
        return i * i

    assert list(ordered_map(slow_first, range(10), calls=3)) == [i * i for i in range(10)]


def test_calls_run_side_by_side_each_on_its_own_torch_threads():
    barrier = threading.Barrier(2, timeout=10)  # breaks unless two calls are in flight together
    seen = []

    def call(i):
        barrier.wait()
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return i

    before = torch.get_num_threads()
    assert list(ordered_map(call, range(4), calls=2)) == [0, 1, 2, 3]
    assert {threads for _, threads in seen} == {1}
    assert all(name.startswith("piqa-call") for name, _ in seen)
    assert torch.get_num_threads() == before  # the caller's own count is untouched


def _fresh_thread_count() -> int:
    box = {}
    t = threading.Thread(target=lambda: box.update(n=torch.get_num_threads()))
    t.start()
    t.join()
    return box["n"]


def test_threads_started_after_the_calls_get_the_callers_count_again():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # whatever the machine: a count the calls' 1 differs from
    try:
        assert list(ordered_map(lambda i: torch.ones(4).sum().item() + i, range(4), calls=2)) == [4, 5, 6, 7]
        assert _fresh_thread_count() == 3
    finally:
        torch.set_num_threads(before)


def test_overlapping_maps_give_new_threads_the_count_back_once_all_are_done():
    """Two threads scoring at once: the second started while the first's calls had set 1, took 1 for the
    count to put back, finished last, and left every later thread on one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    second_started, first_done = threading.Event(), threading.Event()

    def first(i: int) -> int:
        assert second_started.wait(10)
        return i

    def second(i: int) -> int:
        second_started.set()
        assert first_done.wait(10)
        return i

    def run_second() -> None:
        assert list(ordered_map(second, range(2), calls=2)) == [0, 1]

    try:
        a = threading.Thread(target=lambda: list(ordered_map(first, range(2), calls=2)) and first_done.set())
        a.start()
        deadline = time.monotonic() + 10
        while _fresh_thread_count() != 1:  # the first map's calls have set 1: threads now start with it
            assert time.monotonic() < deadline, "the first map's calls never set one thread"
            time.sleep(0.001)
        b = threading.Thread(target=run_second)
        b.start()
        a.join(10)
        b.join(10)
        assert _fresh_thread_count() == 3
    finally:
        torch.set_num_threads(before)


def test_takes_at_most_calls_items_ahead_of_the_results():
    taken = []

    def items():
        for i in range(6):
            taken.append(i)
            yield i

    results = ordered_map(lambda i: i, items(), calls=2)
    assert next(results) == 0
    assert len(taken) <= 2
    assert list(results) == [1, 2, 3, 4, 5]


def test_one_call_runs_on_the_callers_thread():
    names = list(ordered_map(lambda _: threading.current_thread().name, range(3), calls=1))
    assert names == [threading.current_thread().name] * 3


def test_an_error_in_a_call_reaches_the_caller():
    def fail_on_two(i):
        if i == 2:
            raise ValueError("bad item 2")
        return i

    with pytest.raises(ValueError, match="bad item 2"):
        list(ordered_map(fail_on_two, range(5), calls=2))


def test_use_torch_threads_sets_this_threads_count_only():
    before, box = torch.get_num_threads(), {}

    def worker():
        use_torch_threads(1)
        box["worker"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert box["worker"] == 1 and torch.get_num_threads() == before
