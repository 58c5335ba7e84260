"""report.png / report.md from a run folder's metrics.jsonl (rl/report.py), and its command."""
import json
import struct
import subprocess
import sys

import pytest

from rl.report import summary, write_report
from tests.conftest import REPO


def fake_run(tmp_path, steps=10):
    rows = []
    for i in range(steps):
        rows.append({"step": i, "reward/mean": 0.1 * i, "reward/exact_frac": 0.01 * i, "policy/entropy": 4.0 - 0.2 * i,
                     "response/mean_tokens": 4.0, "mismatch/kl": 1e-3 / (i + 1), "mismatch/abs_logprob_diff": 0.02,
                     "timing/step_s": 5.0, "timing/rollout_s": 1.0, "mismatch/jump": int(i == 7),
                     "env/errors": 2 if i == 3 else 0, "train/kl_ref": None})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_report_files(tmp_path):
    fake_run(tmp_path)
    png, md = write_report(tmp_path)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 1000 and height > 600
    text = md.read_text()
    assert "10 steps" in text
    # reward first 4 steps: mean(0, .1, .2, .3) = 0.15; last 4: mean(.6, .7, .8, .9) = 0.75
    assert "| reward/mean | 0.15 | 0.75 |" in text
    assert "Best mean reward: 0.9." in text and "Mismatch jumps: 1." in text and "Env errors: 2." in text


def test_summary_skips_missing_and_null_values():
    s = summary([{"step": 0, "reward/mean": 1.0, "train/kl_ref": None}, {"step": 1}])
    assert s["reward/mean"] == (1.0, 1.0) and s["policy/entropy"] == (None, None) and s["steps"] == 2


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no steps yet"):
        write_report(tmp_path)


def test_report_command(tmp_path):
    fake_run(tmp_path, steps=3)
    ok = subprocess.run([sys.executable, "-m", "rl.report", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "report.png").exists(), ok.stderr
    bad = subprocess.run([sys.executable, "-m", "rl.report", str(tmp_path / "nope")], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr and "run folder" in bad.stderr
