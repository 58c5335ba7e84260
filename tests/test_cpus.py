import os
import threading

import pytest

from common.cpus import parse_cpus, pin_to_cpus


def test_parse_cpus():
    assert parse_cpus("0") == {0} and parse_cpus("0,2-3") == {0, 2, 3} and parse_cpus(" 1 , 4-5") == {1, 4, 5}


def test_pinning_restricts_the_calling_thread_and_its_children():
    allowed = sorted(os.sched_getaffinity(0))
    seen = {}

    def work():
        pin_to_cpus(str(allowed[-1]))
        child = threading.Thread(target=lambda: seen.update(child=os.sched_getaffinity(0)))
        child.start()
        child.join()
        seen["self"] = os.sched_getaffinity(0)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"self": {allowed[-1]}, "child": {allowed[-1]}}
    assert sorted(os.sched_getaffinity(0)) == allowed  # the test's own thread is untouched
    with pytest.raises(ValueError, match="not available"):
        pin_to_cpus(str(max(allowed) + 1000))
