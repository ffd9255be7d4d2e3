"""CoAtNet, ConvMixer, LeViT, CvT and PiT against their plain-PyTorch path.

- Parameter counts of every named configuration against the papers' figures (written here, not computed).
- The fused backends against an fp64 run of ``eager`` (same weights; output and the gradient of every parameter;
  train and eval mode; fp32 backends: "triton" under the interpreter, "cuda" through the emulation build, "auto"),
  as flash-attention checks: per tensor, err(backend fp32 vs fp64) <= C * err(eager fp32 vs fp64) + atol, C = 2.
  fp32 eager is not an exact reference: on LeViT in train mode its gradients are 1.5e-4 (relative) off fp64
  everywhere (the head's BatchNorm1d normalises over a batch of 2, one channel's variance is 1.6e-6 against eps
  1e-5, so every backbone gradient is a cancelling difference), and the two fp32 paths round that differently.
  atol = TOL * scale, TOL = 1e-4 the project's fp32 tolerance and scale the magnitude the tensor's error is
  relative to: max(|fp64 value|, 1) (vitkern.testing's absolute floor), and for a bias, whose gradient is the sum
  of the gradient flowing into its module over every position, the largest per-channel sum of |those terms|
  (the fp32 error of a sum is bounded relative to the sum of its terms' magnitudes, not to the sum itself). That
  matters where the sum cancels to zero in exact arithmetic: LeViT's residual-stream BatchNorm biases in train
  mode (every consumer is a train-mode BatchNorm or a residual), key biases (softmax is shift-invariant):
  fp64 ~1e-14 there, fp32 the rounding of terms of magnitude ~80. A real mistake (a wrong BatchNorm fold, a
  mis-indexed bias, a dropped residual) moves values by 1e-2 of the scale or more.
- The fp64 run: ops.levit_attention and ops.rel_pos_attention take fp32/fp16/bf16 only (their argument check), so
  the fp64 run calls their eager implementation, vitkern.reference's oracle, directly; every other layer is the
  plain PyTorch module in fp64.
- One optimisation step lowers the loss; torch.compile(fullgraph=True) matches eager; the wrong-image-size error;
  reset_classifier and the forward_features/forward_head split.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import vitkern
from vitkern import reference
from vitkern.models import create_model
from vitkern.models.coatnet import CoAtNet
from vitkern.models.convmixer import ConvMixer
from vitkern.models.cvt import CvT
from vitkern.models.levit import LeViT
from vitkern.models.pit import PiT
from vitkern.testing import max_error

NUM_CLASSES = 5
BATCH = 2
TOL = 1e-4
# err(backend) may be this many times err(eager fp32), both against fp64 (flash-attention's factor).
EAGER_ERROR_FACTOR = 2.0
REL_TOL_PARAMS = 0.02

# Published parameter counts in millions: (family module, figure, source).
PAPER_PARAMS_M = {
    "coatnet_0": ("coatnet", 25.0, "CoAtNet paper (Dai et al. 2021), ImageNet-1K results, Params"),
    "coatnet_1": ("coatnet", 42.0, "CoAtNet paper, ImageNet-1K results, Params"),
    "coatnet_2": ("coatnet", 75.0, "CoAtNet paper, ImageNet-1K results, Params"),
    "coatnet_3": ("coatnet", 168.0, "CoAtNet paper, ImageNet-1K results, Params"),
    "coatnet_4": ("coatnet", 275.0, "CoAtNet paper, ImageNet-21K results, Params"),
    "convmixer_1536_20": ("convmixer", 51.6, "ConvMixer paper (Trockman & Kolter 2022), ImageNet results, Params"),
    "convmixer_768_32": ("convmixer", 21.1, "ConvMixer paper, ImageNet results, Params"),
    "convmixer_1024_20_ks9_p14": ("convmixer", 24.4, "ConvMixer paper, ImageNet results, Params"),
    "pit_ti_224": ("pit", 4.9, "PiT paper (Heo et al. 2021), ImageNet results, Params"),
    "pit_xs_224": ("pit", 10.6, "PiT paper, ImageNet results, Params"),
    "pit_s_224": ("pit", 23.5, "PiT paper, ImageNet results, Params"),
    "pit_b_224": ("pit", 73.8, "PiT paper, ImageNet results, Params"),
    "levit_128s": ("levit", 7.8, "LeViT paper (Graham et al. 2021), speed-accuracy table, Params"),
    "levit_128": ("levit", 9.2, "LeViT paper, speed-accuracy table, Params"),
    "levit_192": ("levit", 11.0, "LeViT paper, speed-accuracy table, Params"),
    "levit_256": ("levit", 18.9, "LeViT paper, speed-accuracy table, Params"),
    "levit_384": ("levit", 39.1, "LeViT paper, speed-accuracy table, Params"),
    "cvt_13": ("cvt", 20.0, "CvT paper (Wu et al. 2021), architecture table, #Param"),
    "cvt_21": ("cvt", 32.0, "CvT paper, architecture table, #Param"),
}


def small_model(family: str) -> tuple[nn.Module, int]:
    """A tiny configuration of ``family`` and its input side: 4-64 channels, 1-2 blocks per stage (every block
    kind, downsampling or not, at least once), maps of 1x1 to 8x8 tokens, so that the Triton interpreter runs it in
    seconds. CoAtNet uses C-T-T-T so that a transformer stage sits on a 4x4 map (with C-C-T-T at this size the
    rel-pos windows would be 2x2 and 1x1)."""
    if family == "coatnet":
        model = CoAtNet(
            32,
            depth=(1, 2, 1, 2, 1),
            embed_dim=(4, 4, 64, 32, 32),
            block_types=("C", "T", "T", "T"),
            num_classes=NUM_CLASSES,
            head_hidden_size=16,
        )
        return model, 32
    if family == "convmixer":
        return ConvMixer(4, 2, kernel_size=5, patch_size=4, num_classes=NUM_CLASSES), 16
    if family == "levit":
        return LeViT(64, embed_dim=(16, 32), depth=(1, 1), num_heads=(1, 2), key_dim=16, num_classes=NUM_CLASSES), 64
    if family == "cvt":
        model = CvT(
            embed_dim=(4, 8),
            depth=(1, 1),
            num_heads=(1, 2),
            embed_kernels=(3, 3),
            embed_strides=(2, 2),
            embed_paddings=(1, 1),
            num_classes=NUM_CLASSES,
        )
        return model, 16
    model = PiT(16, patch_size=4, stride=2, head_dim=(2, 2), depth=(1, 1), num_heads=(2, 4), num_classes=NUM_CLASSES)
    return model, 16


FAMILIES = ("coatnet", "convmixer", "cvt", "levit", "pit")


def randomize(model: nn.Module) -> nn.Module:
    """Perturb every parameter (zero-initialised BatchNorm weights, bias tables, class tokens included) and give the
    BatchNorms non-trivial running statistics, so that every path through the model matters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model


class OpRecorder(TorchDispatchMode):
    """Names of the operators dispatched inside the ``with`` block (e.g. "vitkern.depthwise_conv2d.default")."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def run(model: nn.Module, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], set[str]]:
    """Output and parameter gradients of ``(out * weights).sum()`` on ``backend``, and the operators that ran."""
    model.zero_grad()
    with OpRecorder() as recorder:
        with vitkern.backend(backend):
            out = model(x)
        weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
        (out * weights).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}, recorder.names


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """rtol = TOL, atol = TOL times the largest magnitude of ``expected``."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL * scale, msg=lambda m: f"{name}: {m}")


def channel_dim(module: nn.Module) -> int:
    """The dim of ``module``'s output that its bias is broadcast along."""
    return 1 if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) else -1


def run_fp64(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """Output and parameter gradients of ``run`` on ``eager`` in fp64, and for every bias the largest per-channel
    sum of |gradient of its module's output| (the terms its gradient sums). The attention ops refuse fp64, so their
    eager implementation (the reference oracle) is called directly."""
    model = copy.deepcopy(model).double()
    terms: dict[str, float] = {}
    hooks = []
    for module_name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):

            def record(mod, inputs, output, key=f"{module_name}.bias"):
                dims = [d for d in range(output.ndim) if d != channel_dim(mod) % output.ndim]
                output.register_hook(lambda dy: terms.__setitem__(key, dy.abs().sum(dims).max().item()))

            hooks.append(module.register_forward_hook(record))
    with (
        mock.patch.object(vitkern.ops, "levit_attention", reference.levit_attention),
        mock.patch.object(vitkern.ops, "rel_pos_attention", reference.rel_pos_attention),
    ):
        out, grads, _ = run(model, x.double(), "eager")
    for hook in hooks:
        hook.remove()
    return out, grads, terms


def assert_within_eager_error(
    actual: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, name: str, terms: float = 0.0
) -> None:
    """err(actual vs exact) <= EAGER_ERROR_FACTOR * err(eager vs exact) + TOL * max(|exact|, 1, terms)."""
    err = max_error(actual, exact)
    eager_err = max_error(eager, exact)
    scale = max(exact.abs().max().item(), 1.0, terms)
    bound = EAGER_ERROR_FACTOR * eager_err + TOL * scale
    assert err <= bound, (
        f"{name}: max error {err:.3e} against fp64 exceeds {EAGER_ERROR_FACTOR}x eager fp32's {eager_err:.3e} + "
        f"{TOL} x scale {scale:.3e} (= {bound:.3e})"
    )


def check_backend_matches_eager(family: str, backend: str, mode: str) -> None:
    model, img = small_model(family)
    model = randomize(model).train(mode == "train")
    x = torch.randn(BATCH, 3, img, img)
    exact_out, exact_grads, terms = run_fp64(model, x)
    ref_out, ref_grads, ref_ops = run(copy.deepcopy(model), x, "eager")
    out, grads, ops = run(copy.deepcopy(model), x, backend)
    assert not any(op.startswith("vitkern.") for op in ref_ops)
    if backend != "auto":
        fused_ops = {op for op in ops if op.startswith("vitkern.")}
        assert any("backward" in op for op in fused_ops), f"no fused forward and backward on {backend}: {ops}"
    assert_within_eager_error(out, ref_out, exact_out, "output")
    assert set(grads) == set(ref_grads) == set(exact_grads)
    for name, ref_grad in ref_grads.items():
        assert ref_grad is not None, f"{name}: no gradient on the eager path"
        assert grads[name] is not None, f"{name}: no gradient on the {backend} path"
        assert_within_eager_error(grads[name], ref_grad, exact_grads[name], f"grad of {name}", terms.get(name, 0.0))


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name):
    family, paper_m, source = PAPER_PARAMS_M[name]
    with torch.device("meta"):
        model = create_model(name)
    assert type(model).__module__ == f"vitkern.models.{family}"
    count_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count_m - paper_m) <= REL_TOL_PARAMS * paper_m, f"{name}: {count_m:.2f}M against {paper_m}M ({source})"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_matches_eager(family, mode):
    check_backend_matches_eager(family, "triton", mode)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_eager(family, mode):
    check_backend_matches_eager(family, "cuda", mode)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_backend_matches_eager_in_eval(family):
    """The CPU path (backend "auto"): SDPA, the folded BatchNorm epilogues, the CPU attention path."""
    check_backend_matches_eager(family, "auto", "eval")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_lowers_loss(family):
    model, img = small_model(family)
    model.train()
    x = torch.randn(4, 3, img, img)
    target = torch.arange(4) % NUM_CLASSES
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = F.cross_entropy(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), target)
    assert after.item() < loss.item()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_fullgraph_matches_eager(family):
    """One graph, with the fused custom ops in it (backend "triton"), matching the uncompiled eager model. Dynamo
    starts clean: several families share ``ClassifierModel.forward``, whose cache would otherwise hold the others'
    compilations."""
    torch._dynamo.reset()
    model, img = small_model(family)
    model = randomize(model).eval()
    x = torch.randn(BATCH, 3, img, img)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        with vitkern.backend("eager"):
            expected = model(x)
        with vitkern.backend("triton"):
            actual = compiled(x)
    assert counter.frame_count == 1
    targets = {str(node.target) for gm in counter.graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any(target.startswith("vitkern.") for target in targets), sorted(targets)
    assert_scaled_close(actual, expected, "compiled output")


@pytest.mark.parametrize("family", ["coatnet", "levit", "pit"])
def test_wrong_image_size_names_both_sizes(family):
    model, img = small_model(family)
    x = torch.randn(1, 3, 2 * img, 2 * img)
    with pytest.raises(ValueError, match=f"{img}x{img}.*{2 * img}x{2 * img}"):
        model(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_reset_classifier_and_features(family):
    model, img = small_model(family)
    model.eval()
    x = torch.randn(BATCH, 3, img, img)
    with torch.no_grad():
        logits = model(x)
        split = model.forward_head(model.forward_features(x))
        model.reset_classifier(7)
        assert model.num_classes == 7
        assert model(x).shape == (BATCH, 7)
        model.reset_classifier(0)
        features = model(x)
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(split, logits)
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert features.shape == (BATCH, model.num_features if family != "coatnet" else model.head_hidden_size)
    torch.testing.assert_close(features, pre_logits)


def test_convmixer_eval_block_is_one_fused_call(monkeypatch):
    """In eval mode off ``eager`` the depthwise block is one op call carrying the folded BatchNorm and the
    residual; in train mode the BatchNorm stays outside."""
    from vitkern.models import _layers

    calls = []
    original = _layers.depthwise_conv2d

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(_layers, "depthwise_conv2d", recording)
    model, img = small_model("convmixer")
    x = torch.randn(BATCH, 3, img, img)
    with torch.no_grad():
        model.eval()(x)
        assert len(calls) == 2
        assert all(c["scale"] is not None and c["shift"] is not None and c["residual"] is not None for c in calls)
        calls.clear()
        model.train()(x)
        assert len(calls) == 2
        assert all("scale" not in c and "residual" not in c for c in calls)


def test_convmixer_768_32_uses_relu_as_the_paper():
    from vitkern.models.convmixer import convmixer_768_32

    with torch.device("meta"):
        model = convmixer_768_32()
    assert isinstance(model.blocks[0].act1, nn.ReLU)


def test_levit_distillation_heads():
    """Distillation training returns (class, distillation) logits; otherwise their mean."""
    model, img = small_model("levit")
    model = randomize(model)
    x = torch.randn(BATCH, 3, img, img)
    with torch.no_grad():
        model.distilled_training = True
        out, out_dist = model.train()(x)
        model.eval()
        features = model.forward_features(x).mean(dim=(2, 3))
        expected = (model.head(features) + model.head_dist(features)) / 2
        torch.testing.assert_close(model(x), expected)
    assert out.shape == out_dist.shape == (BATCH, NUM_CLASSES)
    assert not torch.allclose(out, out_dist)
