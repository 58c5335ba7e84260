"""The GPU kernel switch (policies/fast_kernels.py) on this CPU machine: what `learner.kernels`
accepts, that without the `gdn` kind packed rows use the PyTorch delta rule, that a patched forward
runs the original on CPU tensors, and that fla gets the same cu_seqlens objects for every layer (its
chunk indices are then built once per row, from the host copy `pack()` attaches). The kernels
themselves are checked against float64 on the H200 (bench/learner_gpu.py, results in
bench/results/learner_gpu_h200.md)."""
import pytest
import torch

from policies import fast_kernels as fk
from policies.gdn_varlen import fla_cu_seqlens
from rl.packing import pack
from tests.test_packing import tiny_model as build_tiny


@pytest.fixture
def tiny_model():
    return build_tiny("qwen3_5")


def test_parse_kernels():
    assert fk.parse_kernels("auto") == set(fk.KINDS)
    assert fk.parse_kernels("torch") == set()
    assert fk.parse_kernels("gdn, swiglu") == {"gdn", "swiglu"}
    for bad in ("gdn,flash", "", ","):
        with pytest.raises(ValueError, match="use auto, torch or a comma-separated subset of gdn"):
            fk.parse_kernels(bad)
    with pytest.raises(ValueError, match="unknown.*qrl_conv"):
        fk.parse_kernels("gdn,qrl_conv")


def test_install_on_cpu_marks_the_pytorch_rule_and_patches_nothing(tiny_model):
    gdn = [m for m in tiny_model.modules() if type(m).__name__.endswith("GatedDeltaNet")]
    assert gdn
    assert fk.install_fast_kernels(tiny_model, {"rms_norm", "swiglu"}) == {}  # no CUDA here: nothing switched
    assert all(getattr(m, "_qrl_torch_rule", False) for m in gdn)
    assert not any(getattr(m, fk._MARK, False) for m in tiny_model.modules())


def test_patched_forward_runs_the_original_on_cpu(tiny_model):
    norm = next(m for m in tiny_model.modules() if type(m).__name__ == "Qwen3_5RMSNorm")
    x = torch.randn(3, norm.weight.shape[0])
    want = norm(x)
    calls = []
    fk._patch(norm, lambda self, x: calls.append(x) or x * 0)
    assert torch.equal(norm(x), want) and not calls
    assert getattr(norm, fk._MARK)
    assert fk._kind(norm) is None  # never patched twice


def test_fla_gets_the_same_cu_seqlens_objects_for_every_layer():
    ids = torch.randint(0, 50, (3, 9))
    lengths = torch.tensor([9, 4, 6])
    flat, positions, cu = pack(ids, lengths)
    assert torch.equal(flat[0], torch.cat([ids[0, :9], ids[1, :4], ids[2, :6]]))
    assert positions[0].tolist() == list(range(9)) + list(range(4)) + list(range(6))
    first, second = fla_cu_seqlens(cu), fla_cu_seqlens(cu)
    assert first["cu_seqlens"] is second["cu_seqlens"] and first["cu_seqlens_cpu"] is second["cu_seqlens_cpu"]
    assert first["cu_seqlens"].dtype == torch.long and first["cu_seqlens_cpu"].tolist() == [0, 9, 13, 19]


def test_projected_conv_per_part_equals_one_conv_then_split(tiny_model, monkeypatch):
    """`fast_projected_conv` (q, k, v projected and convolved separately, so each comes out contiguous) computes
    what projecting all of qkv, convolving and splitting computes, gradients included. The conv kernel here is
    the platform's PyTorch varlen conv under fla's signature (fla's Triton kernel needs CUDA; the H200 bench
    checks it against float64)."""
    import sys
    import types

    from policies.gdn_varlen import fast_projected_conv, varlen_causal_conv

    def conv(x, weight, bias=None, activation=None, cu_seqlens=None, cu_seqlens_cpu=None):
        assert x.is_contiguous() and cu_seqlens.dtype == torch.long and cu_seqlens_cpu is not None
        return varlen_causal_conv(x[0].t(), weight, bias, activation, cu_seqlens).t().contiguous().unsqueeze(0), None

    fake = types.ModuleType("fla.modules.causal_conv1d")
    fake.causal_conv1d = conv
    for name in ("fla", "fla.modules"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d", fake)
    gdn = next(m for m in tiny_model.modules() if type(m).__name__.endswith("GatedDeltaNet"))
    _, _, cu = pack(torch.zeros(3, 9, dtype=torch.long), torch.tensor([9, 2, 6]))
    h = torch.randn(1, 17, tiny_model.config.hidden_size, requires_grad=True)
    sizes = [gdn.key_dim, gdn.key_dim, gdn.value_dim]
    grads = []
    for per_part in (True, False):
        if per_part:
            q, k, v = fast_projected_conv(gdn, h, cu)
            assert all(t.is_contiguous() and t.shape[-1] == n for t, n in zip((q, k, v), sizes))
        else:
            q, k, v = conv(gdn.in_proj_qkv(h), gdn.conv1d.weight.squeeze(1), gdn.conv1d.bias, gdn.activation,
                           **fla_cu_seqlens(cu))[0].split(sizes, dim=-1)
        out = torch.cat([q, k, v], -1)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), h.grad.clone(), gdn.in_proj_qkv.weight.grad.clone(), gdn.conv1d.weight.grad.clone()))
        h.grad = None
        tiny_model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
