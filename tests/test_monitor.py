from rl.monitor import MismatchMonitor


def test_mismatch_jump_is_flagged_once_history_exists():
    m = MismatchMonitor(factor=5.0, floor=1e-3, window=10, min_history=3)
    assert m.update(0.5) is None and m.update(0.5) is None and m.update(0.5) is None  # no history yet
    assert m.update(2.0) is None  # 4x the median: drift, not a jump
    msg = m.update(3.0)  # 6x the median of [0.5, 0.5, 0.5, 2.0]
    assert msg and "mismatch/kl 3" in msg and "weight sync" in msg


def test_tiny_values_below_the_floor_never_warn():
    m = MismatchMonitor(floor=1e-3)
    for v in (1e-7, 1e-7, 1e-7, 5e-4):  # 5000x the median but below the floor (fp32 parity noise)
        assert m.update(v) is None
