"""The Triton varlen causal conv (policies/varlen_conv.py, kernel kind `qrl_conv`) computes the same
function and gradients as the PyTorch varlen conv (policies/gdn_varlen.py): zero history at every
sample start, including samples shorter than the kernel; run on CPU under Triton's interpreter in a
fresh TRITON_INTERPRET=1 subprocess (Triton picks interpreter mode when it is first imported), as in
tests/test_fused_logprobs.py. By hand: `TRITON_INTERPRET=1 pytest -o python_functions='interp_*' tests/test_varlen_conv.py`."""
import os
import re
import subprocess
import sys

import pytest
import torch

from policies.gdn_varlen import varlen_causal_conv
from tests.conftest import REPO


def test_kernels_under_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-o", "python_functions=interp_*"]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 3 and "skipped" not in out, out[-4000:]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("with_bias,activation", [(False, "silu"), (True, "silu"), (True, None)])
def interp_matches_the_pytorch_conv(with_bias, activation):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from policies.varlen_conv import varlen_conv

    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 2, 40, 3, 29]  # samples shorter than the kernel, rows not a multiple of the block
    C, K = 150, 4  # channels not a multiple of the block
    N = sum(lengths)
    cu = torch.tensor([0] + torch.cumsum(torch.tensor(lengths), 0).tolist(), dtype=torch.int32)
    x = torch.randn(1, N, C, generator=g)
    w = torch.randn(C, K, generator=g) * 0.5
    b = torch.randn(C, generator=g) if with_bias else None
    dy = torch.randn(1, N, C, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        y = fn(*leaves)
        (y * dy).sum().backward()
        return [y] + [t.grad for t in leaves if t is not None]

    fast = run(lambda x, w, b: varlen_conv(x, w, b, activation, cu))
    ref = run(lambda x, w, b: varlen_causal_conv(x[0].t(), w, b, activation, cu).t().unsqueeze(0))
    for name, a, r in zip(["y", "dx", "dw", "db"], fast, ref):
        assert rel(a, r) < 1e-5, (name, rel(a, r))
    # a sample's first outputs see only its own tokens: zeroing the previous sample changes nothing
    x2 = x.clone()
    x2[0, 8:48] = 0  # sample 3 (rows 8..47) zeroed
    y2 = varlen_conv(x2, w, b, activation, cu)
    assert torch.equal(y2[0, 48:], fast[0][0, 48:].detach())
