"""Ordered concurrent calls: order, laziness, side-by-side execution and per-thread torch threads."""

import threading

import pytest
import torch

from piqa_core.concurrency import ordered_map, use_torch_threads


def test_results_come_back_in_input_order():
    import time

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


def test_threads_started_after_the_calls_get_the_callers_count_again():
    def fresh_thread_count() -> int:
        box = {}
        t = threading.Thread(target=lambda: box.update(n=torch.get_num_threads()))
        t.start()
        t.join()
        return box["n"]

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # whatever the machine: a count the calls' 1 differs from
    try:
        assert list(ordered_map(lambda i: torch.ones(4).sum().item() + i, range(4), calls=2)) == [4, 5, 6, 7]
        assert fresh_thread_count() == 3
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
