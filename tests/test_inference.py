"""``granet_ray.inference``: the sparse kernels against ``torch.nn.functional`` for every
convolution parameter, the per-layer dense / sparse choice, BatchNorm folding, ``convert`` on
a real checkpoint, and the ``ckpt bench`` command. No timings are asserted here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from granet_ray.inference import (
    SparseConv2d,
    SparseLinear,
    convert,
    fold_batchnorm,
    layer_report,
)
from granet_ray.inference import modules as inference_modules
from granet_ray.inference.bench import benchmark, by_kind
from granet_ray.models import MnistConvNet
from granet_ray.store import load_sparse, save_sparse

TOL = {"atol": 1e-5, "rtol": 1e-4}

# (in, out, kernel, stride, padding, dilation, groups, (H, W))
CONVS = [
    (8, 16, 3, 1, 1, 1, 1, (9, 11)),
    (8, 16, 3, 2, 1, 1, 1, (9, 11)),
    (8, 12, 1, 1, 0, 1, 1, (7, 7)),
    (8, 12, 1, 2, 0, 1, 1, (7, 8)),
    (8, 12, 1, (1, 2), 1, 1, 2, (5, 6)),
    (3, 8, 7, 2, 3, 1, 1, (23, 21)),
    (8, 6, (3, 5), (2, 1), (1, 2), (2, 1), 2, (13, 10)),
    (8, 8, 3, 1, "same", 2, 8, (10, 9)),
    (8, 8, 3, 2, 1, 1, 8, (10, 9)),
    (4, 5, (2, 3), 3, "valid", 1, 1, (12, 13)),
    (8, 12, 3, 1, (0, 2), (1, 3), 4, (9, 9)),
    (6, 4, (1, 4), 1, "same", 1, 2, (5, 7)),
    (4, 4, 5, 3, 2, 2, 1, (17, 15)),
    (5, 7, 2, 1, 0, 1, 1, (2, 3)),
    (6, 3, 3, 1, 1, 1, 1, (1, 1)),
    (16, 8, 3, 2, 1, 1, 1, (6, 77)),  # wide rows: the vectorized stride-2 layout
]


def masked(weight: torch.Tensor, density: float | int, generator: torch.Generator) -> torch.Tensor:
    """``weight`` keeping ``density`` of its entries (a float) or exactly that many (an int)."""
    flat = weight.reshape(-1)
    count = density if isinstance(density, int) else round(density * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.randperm(flat.numel(), generator=generator)[:count]] = True
    return (flat * keep).view_as(weight)


def sparse_conv(spec, density, generator, bias=True):
    cin, cout, k, s, p, d, g, _ = spec
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(masked(conv.weight, density, generator))
    return conv, SparseConv2d(conv, kernel="sparse").eval()


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "-".join(map(str, s[2:7])))
@pytest.mark.parametrize("density", [0, 1, 0.05, 0.4, 1.0], ids=lambda d: f"d{d}")
def test_conv_matches_functional(spec, density) -> None:
    generator = torch.Generator().manual_seed(hash((spec[:7], density)) % 2**31)
    conv, sparse = sparse_conv(spec, density, generator)
    for batch in (1, 3):
        x = torch.randn(batch, spec[0], *spec[7], generator=generator)
        expected = F.conv2d(
            x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        x_last = x.contiguous(memory_format=torch.channels_last)
        dense_last = conv(x_last)
        with torch.no_grad():
            out = sparse(x)
            last = sparse(x_last)
        torch.testing.assert_close(out, expected, **TOL)
        assert out.is_contiguous()
        torch.testing.assert_close(last, expected, **TOL)
        if not dense_last.is_contiguous():  # the dense conv's memory format, where it differs
            assert last.is_contiguous(memory_format=torch.channels_last)


def test_conv_empty_output_channels_and_no_bias() -> None:
    generator = torch.Generator().manual_seed(1)
    conv, _ = sparse_conv((6, 10, 3, 1, 1, 1, 1, (8, 8)), 0.3, generator, bias=False)
    with torch.no_grad():
        conv.weight[::2] = 0  # every other output channel empty
    sparse = SparseConv2d(conv, kernel="sparse")
    x = torch.randn(2, 6, 8, 8, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), **TOL)
    assert sparse.nnz == int(conv.weight.count_nonzero())


def test_conv_batch_zero_and_sliced_input() -> None:
    generator = torch.Generator().manual_seed(2)
    conv, sparse = sparse_conv((4, 6, 3, 1, 1, 1, 1, (9, 9)), 0.5, generator)
    x = torch.randn(3, 8, 9, 12, generator=generator)[:, ::2, :, 1:10]  # non-contiguous view
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), **TOL)
        assert sparse(torch.zeros(0, 4, 9, 9)).shape == (0, 6, 9, 9)


@pytest.mark.parametrize("density", [0, 1, 0.1, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_functional(density, bias) -> None:
    generator = torch.Generator().manual_seed(3)
    linear = nn.Linear(37, 19, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(masked(linear.weight, density, generator))
    sparse = SparseLinear(linear, kernel="sparse")
    for shape in ((1, 37), (5, 37), (2, 3, 37), (37,)):
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            out = sparse(x)
        torch.testing.assert_close(out, linear(x), **TOL)


def test_dense_path_for_training_and_grad() -> None:
    generator = torch.Generator().manual_seed(4)
    conv, sparse = sparse_conv((4, 4, 3, 1, 1, 1, 1, (6, 6)), 0.2, generator)
    x = torch.randn(2, 4, 6, 6, generator=generator, requires_grad=True)
    out = sparse(x)  # autograd through the dense path
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    sparse.train()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), **TOL)
    assert not sparse.choices


def test_reflect_padding_is_refused_and_stays_dense_in_convert() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d(conv)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.1)
    model = convert(nn.Sequential(conv, nn.Conv1d(4, 4, 1)))
    assert isinstance(model.get_submodule("0"), nn.Conv2d)
    reasons = {e.name: e.dense_reason for e in layer_report(model)}
    assert "padding_mode" in reasons["0"] and "Conv1d" in reasons["1"]


def test_auto_choice_times_each_shape_once_and_keeps_the_faster(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(5)
    conv, _ = sparse_conv((4, 8, 3, 1, 1, 1, 1, (7, 7)), 0.2, generator)
    layer = SparseConv2d(conv, kernel="auto")
    calls: list[str] = []
    faster = {"name": "dense"}

    def fake_timed(fn):
        fn()
        name = "sparse" if len(calls) % 2 == 0 else "dense"  # choose() alternates, sparse first
        calls.append(name)
        return 1.0 if name == faster["name"] else 2.0

    monkeypatch.setattr(inference_modules, "timed", fake_timed)
    monkeypatch.setattr(layer, "timing_repeats", 2)
    x1, x2 = torch.randn(1, 4, 7, 7), torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(layer(x1), conv(x1), **TOL)
        layer(x1)
        faster["name"] = "sparse"
        torch.testing.assert_close(layer(x2), conv(x2), **TOL)
        layer(x2)
    assert len(calls) == 8  # two timed calls of each path, once per shape
    kernels = {shape[0]: choice.kernel for (shape, _), choice in layer.choices.items()}
    assert kernels == {1: "dense", 2: "sparse"}
    assert layer.choices[((2, 4, 7, 7), True)].dense_s == 2.0


def test_convert_leaves_dense_layers_and_reports_choices() -> None:
    torch.manual_seed(6)
    model = MnistConvNet()
    masks = {
        "conv1.weight": torch.ones_like(model.conv1.weight, dtype=torch.bool),  # dense: kept
        "conv2.weight": torch.rand_like(model.conv2.weight) < 0.1,
        "fc1.weight": torch.rand_like(model.fc1.weight) < 0.05,
        "fc2.weight": torch.rand_like(model.fc2.weight) < 0.3,
    }
    fast = convert(model, masks)
    assert isinstance(fast.conv1, nn.Conv2d) and isinstance(fast.conv2, SparseConv2d)
    assert isinstance(fast.fc1, SparseLinear) and isinstance(fast.fc2, SparseLinear)
    assert model.conv2.weight.count_nonzero() == model.conv2.weight.numel()  # input untouched
    reference = MnistConvNet()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_parameter(name).mul_(mask)
        for batch in (1, 4):
            x = torch.randn(batch, 1, 28, 28)
            torch.testing.assert_close(fast(x), reference(x), **TOL)
            last = x.contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(fast(last), reference(x), **TOL)
    report = {entry.name: entry for entry in layer_report(fast)}
    assert report["conv1"].dense_reason.startswith("density 1.000")
    assert {shape[0] for shape in report["conv2"].choices} == {1, 4}
    assert all(c.kernel in ("sparse", "dense") for c in report["fc1"].choices.values())
    with pytest.raises(ValueError, match="names no Conv"):
        convert(model, {"nope.weight": masks["fc1.weight"]})


class ConvBnNet(nn.Module):
    """conv-bn-relu twice, a residual add, and a conv whose output also feeds the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        mid = self.conv3(out)
        out = self.bn3(mid) + mid  # conv3 feeds two nodes: not folded
        return self.fc(out.mean((2, 3)))


def test_batchnorm_folds_where_exact() -> None:
    torch.manual_seed(7)
    model = ConvBnNet()
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    with torch.no_grad():
        for conv in (model.conv1, model.conv2, model.conv3):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.2)
    model.eval()
    folded = fold_batchnorm(model)
    names = dict(folded.named_modules())
    assert "bn1" not in names and "bn2" not in names and "bn3" in names
    assert torch.equal(folded.conv1.weight != 0, model.conv1.weight != 0)  # same pattern
    fast = convert(model, kernel="sparse")
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), **TOL)
    assert isinstance(fast.conv1, SparseConv2d) and fast.conv1.bias is not None


def test_untraceable_model_converts_without_folding() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                return self.bn(self.conv(x))
            return self.conv(x)

    model = Branchy().eval()
    with torch.no_grad():
        model.conv.weight.mul_(torch.rand_like(model.conv.weight) < 0.3)
    with pytest.warns(UserWarning, match="not folded"):
        fast = convert(model, kernel="sparse")
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), **TOL)


def test_convert_from_a_real_checkpoint(tmp_path) -> None:
    torch.manual_seed(8)
    trained = MnistConvNet()
    masks = {
        name: torch.rand_like(p) < 0.1
        for name, p in trained.named_parameters()
        if name.endswith("weight")
    }
    with torch.no_grad():
        for name, mask in masks.items():
            trained.get_parameter(name).mul_(mask)
    uri = save_sparse(trained, tmp_path / "ckpt", masks=masks)
    model = MnistConvNet()
    checkpoint = load_sparse(uri, model=model)
    fast = convert(model, checkpoint.masks)
    fast_zeros = convert(model)  # masks=None: the zeros of the weights
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = trained.eval()(x)
        torch.testing.assert_close(fast(x), expected, **TOL)
        torch.testing.assert_close(fast_zeros(x), expected, **TOL)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert isinstance(fast.get_submodule(name), (SparseConv2d, SparseLinear))


def test_benchmark_reports_whole_model_and_layers() -> None:
    torch.manual_seed(9)
    model = MnistConvNet()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand_like(p) < 0.1)
    results = benchmark(
        model, None, (1, 28, 28), batches=(1, 2), repeats=2, layer_repeats=1, csr_repeats=1
    )
    assert [r.batch for r in results] == [1, 2]
    for result in results:
        assert len(result.dense_s) == len(result.sparse_s) == 2 and result.speedup > 0
        assert [layer.name for layer in result.layers] == ["conv1", "conv2", "fc1", "fc2"]
        assert all(layer.csr_s is not None for layer in result.layers)
        kinds = by_kind(result.layers)
        assert set(kinds) == {"3x3", "fc"} and kinds["fc"]["layers"] == 2


PORTABLE_CHECK = """
import torch, torch.nn.functional as F
from torch import nn
from granet_ray.inference import SparseConv2d, SparseLinear, kernels
assert kernels.isa() == {isa!r}, kernels.isa()
torch.manual_seed(0)
for args, shape in [((8, 16, 3, 2, 1), (2, 8, 9, 40)), ((8, 12, 1), (1, 8, 7, 7)),
                    ((8, 8, 3, 1, 1, 2, 8), (3, 8, 10, 9)), ((6, 3, 3, 1, 1), (1, 6, 1, 1))]:
    conv = nn.Conv2d(*args)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    x = torch.randn(*shape)
    torch.testing.assert_close(SparseConv2d(conv, kernel="sparse")(x), conv(x).detach(),
                               atol=1e-5, rtol=1e-4)
linear = nn.Linear(40, 9)
for n in (1, 5):
    x = torch.randn(n, 40)
    torch.testing.assert_close(SparseLinear(linear, kernel="sparse")(x), linear(x).detach(),
                               atol=1e-5, rtol=1e-4)
"""


@pytest.mark.parametrize(("flags", "isa"), [("", "portable"), ("-mavx2 -mfma", "avx2")])
def test_other_vector_paths_build_and_match(flags, isa, tmp_path) -> None:
    env = {**os.environ, "GRANET_RAY_KERNEL_FLAGS": flags, "GRANET_RAY_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", PORTABLE_CHECK.format(isa=isa)], check=True, env=env)


def test_cli_ckpt_bench_prints_layers_and_whole_model(tmp_path, capsys) -> None:
    from granet_ray.cli import main

    torch.manual_seed(11)
    model = MnistConvNet()
    masks = {n: torch.rand_like(p) < 0.1 for n, p in model.named_parameters() if p.dim() > 1}
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    uri = save_sparse(model, tmp_path / "ckpt", masks=masks)
    argv = ["ckpt", "bench", uri, "--model", "mnist_convnet", "--batch", "3", "--repeats", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("conv1", "conv2", "fc1", "fc2", "b1 speedup", "b3 kernel", "whole model"):
        assert text in out
    assert "batch 3: whole model" in out
    assert main(["ckpt", "bench", uri, "--model", "resnet50"]) == 2  # does not fit: bad input
    assert "does not fit the model" in capsys.readouterr().err
    assert main(["ckpt", "bench", uri, "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_import_loads_no_ray() -> None:
    code = "import sys, granet_ray.inference; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


class ResidualNet(nn.Module):
    """A bottleneck-like block: ``out += identity`` then ReLU, a `+` form, and `x += conv`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += identity
        out = self.relu(out)
        out = F.relu(x * 2 + self.conv3(out))
        skip = out * 1
        skip += self.conv4(out)  # `skip` changes in place: not fused
        return skip + out


@pytest.mark.parametrize("kernel", ["sparse", "dense", "auto"])
def test_residual_and_relu_fuse_into_sparse_layers(kernel) -> None:
    torch.manual_seed(10)
    model = ResidualNet().eval()
    with torch.no_grad():
        for conv in (model.conv1, model.conv2, model.conv3, model.conv4):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    fast = convert(model, kernel=kernel)
    assert fast.conv1.relu and fast.conv2.relu and fast.conv3.relu and not fast.conv4.relu
    calls = [n for n in fast.graph.nodes if n.op == "call_module" and n.target == "conv2"]
    assert len(calls) == 1 and len(calls[0].args) == 2  # conv2(out, identity)
    for batch in (1, 3):
        x = torch.randn(batch, 4, 9, 7)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), **TOL)
            last = x.contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(fast(last), model(x), **TOL)
