"""vitkern.patch on timm models: the patched model against an unpatched deep copy (output and every parameter
gradient, train and eval), what patched() reports, unpatch, state_dicts, the modules left alone, torch.compile.

Models are built with random weights at reduced sizes (timm's size overrides; ConvMixer from its class with the
convmixer_768_32 kernel and patch), their learned biases and BatchNorm statistics randomised so every fused term
is exercised (timm initialises LeViT's biases and some norm weights to zero).
"""

import copy
import functools
import os

import pytest
import torch
import torch.nn as nn

import vitkern

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm", reason="tests/test_patch.py patches timm models: pip install timm")

from timm.models.convmixer import ConvMixer  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
NUM_CLASSES = 10
SMALL_MAXXVIT = dict(img_size=64, embed_dim=(32, 32, 64, 64), depths=(1, 1, 1, 1), stem_width=(16, 32))
SMALL_SWIN = dict(img_size=56, window_size=7, embed_dim=32, depths=(2, 2), num_heads=(2, 4))
BUILDERS = {
    "levit_128s": lambda: timm.create_model(
        "levit_128s", img_size=64, embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(2, 3, 4), key_dim=8
    ),
    "coatnet_0_rw_224": lambda: timm.create_model("coatnet_0_rw_224", **SMALL_MAXXVIT),
    "maxvit_tiny_rw_224": lambda: timm.create_model("maxvit_tiny_rw_224", **SMALL_MAXXVIT),
    "maxvit_tiny_tf_224": lambda: timm.create_model("maxvit_tiny_tf_224", **SMALL_MAXXVIT),
    "swin_tiny_patch4_window7_224": lambda: timm.create_model("swin_tiny_patch4_window7_224", **SMALL_SWIN),
    "convnext_tiny": lambda: timm.create_model("convnext_tiny", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    "convmixer_768_32": lambda: ConvMixer(dim=32, depth=2, kernel_size=7, patch_size=7),
}
IMAGE = {"swin_tiny_patch4_window7_224": 56}
# the timm classes whose instances each model should have on the fused attention ops
ATTENTION = {
    "levit_128s": {"Attention": "levit_attention", "AttentionDownsample": "levit_attention"},
    "coatnet_0_rw_224": {"Attention2d": "rel_pos_attention"},
    "maxvit_tiny_rw_224": {"AttentionCl": "rel_pos_attention"},
    "maxvit_tiny_tf_224": {"AttentionCl": "rel_pos_attention"},
    "swin_tiny_patch4_window7_224": {"WindowAttention": "rel_pos_attention"},
    "convnext_tiny": {},
    "convmixer_768_32": {"Residual": "depthwise_conv2d"},
}


def randomise(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attention_biases", "relative_position_bias_table")):
                param.normal_(0.0, 0.5)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def build(name: str) -> nn.Module:
    model = BUILDERS[name]()
    model.reset_classifier(NUM_CLASSES)
    return randomise(model)


def image(name: str, batch: int = 2) -> torch.Tensor:
    size = IMAGE.get(name, 64)
    return torch.randn(batch, 3, size, size)


def expected_report(model: nn.Module, name: str) -> set[tuple[str, str]]:
    """What patched() should list, found independently: the model's instances of the expected timm classes and its
    depthwise convolutions."""
    want = set()
    for qualified, module in model.named_modules():
        kind = ATTENTION[name].get(type(module).__name__)
        if kind is not None:
            want.add((qualified, kind))
        if type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels:
            want.add((qualified, "depthwise_conv2d"))
    return want


def reported(model: nn.Module) -> set[tuple[str, str]]:
    """patched(model), each entry cut to its op's short name."""
    return {(qualified, what.removeprefix("vitkern.ops.").split(" ")[0]) for qualified, what in vitkern.patched(model)}


def compare(patched_model, reference_model, x, train: bool, modules=None):
    """Output and every parameter gradient of the patched model against the unpatched copy (the same random stream
    for both: Swin's and CoAtNet's stochastic depth draws in training)."""
    patched_module, reference_module = modules or (patched_model, reference_model)
    patched_module.train(train)
    reference_module.train(train)
    torch.manual_seed(1)
    out = patched_model(x)
    torch.manual_seed(1)
    want = reference_model(x)
    torch.testing.assert_close(out, want, **TOL)
    dout = torch.randn_like(want)
    out.backward(dout)
    want.backward(dout)
    for (name, param), (_, ref_param) in zip(patched_module.named_parameters(), reference_module.named_parameters()):
        if ref_param.grad is None:
            assert param.grad is None, name
            continue
        # whole-model gradients through train-mode BatchNorm reach tens: atol relative to each one's largest entry
        scale = max(1.0, ref_param.grad.abs().max().item())
        torch.testing.assert_close(param.grad, ref_param.grad, rtol=TOL["rtol"], atol=TOL["atol"] * scale, msg=name)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_patched_model_matches_unpatched(name, train):
    model = build(name)
    reference_model = copy.deepcopy(model)
    assert vitkern.patch(model) is model
    report = reported(model)
    assert report == expected_report(model, name)
    # train-mode BatchNorm over a small batch amplifies rounding differences far past the ops' own: 8 images
    compare(model, reference_model, image(name, 8 if train else 2), train)


# one module of each model on the Triton backend, the smallest that holds the fused op (the interpreter is slow),
# and how many leading entries of its captured input to keep (Swin: the 4 windows of one image)
TRITON_MODULES = {
    "levit_128s": ("stages.1.downsample.attn_downsample", 1),
    "coatnet_0_rw_224": ("stages.3.blocks.0.attn", 1),
    "maxvit_tiny_rw_224": ("stages.3.blocks.0.attn_grid.attn", 1),
    "maxvit_tiny_tf_224": ("stages.3.blocks.0.attn_grid.attn", 1),
    "swin_tiny_patch4_window7_224": ("layers.0.blocks.1.attn", 4),
    "convnext_tiny": ("stages.0.blocks.0.conv_dw", 1),
    "convmixer_768_32": ("blocks.0.0", 1),
}


# Swin at a 4 x 4 window (still 4 windows, the second block shifted) keeps the interpreted kernels short
TRITON_BUILDERS = {
    "swin_tiny_patch4_window7_224": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", **{**SMALL_SWIN, "img_size": 32, "window_size": 4}
    ),
}
TRITON_IMAGE = {"swin_tiny_patch4_window7_224": 32}
# training runs forward and backward; the attention modules' eval forward is the same call, ConvMixer's is not
# (the BatchNorm folds into the epilogue)
TRITON_CASES = [(name, True) for name in BUILDERS] + [("convmixer_768_32", False)]


@pytest.mark.parametrize("name,train", TRITON_CASES, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in TRITON_CASES])
def test_patched_module_on_triton(name, train):
    model = randomise(TRITON_BUILDERS.get(name, BUILDERS[name])())
    module_name, keep = TRITON_MODULES[name]
    module = model.get_submodule(module_name)
    captured = {}

    def capture(_, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        size = TRITON_IMAGE.get(name, IMAGE.get(name, 64))
        model.eval()(torch.randn(1, 3, size, size))
    handle.remove()
    args, kwargs = captured["call"]
    x = args[0][:keep].clone()
    reference_module = copy.deepcopy(module)
    vitkern.patch(module)
    assert vitkern.patched(module)
    if name == "swin_tiny_patch4_window7_224":
        assert kwargs["mask"] is not None  # the shifted block: the mask goes through the kernel
    with vitkern.backend("triton"):
        compare(
            functools.partial(module, **kwargs),
            functools.partial(reference_module, **kwargs),
            x,
            train,
            modules=(module, reference_module),
        )


def test_unpatch_restores_bitwise_behaviour():
    for name in ("swin_tiny_patch4_window7_224", "convmixer_768_32", "levit_128s"):
        model = build(name).eval()
        reference_model = copy.deepcopy(model)
        x = image(name)
        vitkern.patch(model)
        assert vitkern.unpatch(model) is model
        assert vitkern.patched(model) == []
        assert all("forward" not in module.__dict__ for module in model.modules())
        with torch.no_grad():
            assert torch.equal(model(x), reference_model(x))


def test_state_dict_unchanged_by_patching():
    model = build("maxvit_tiny_tf_224")
    before = {key: (value.clone(), value.data_ptr()) for key, value in model.state_dict().items()}
    vitkern.patch(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in after.items():
        assert torch.equal(value, before[key][0]) and value.data_ptr() == before[key][1], key


def test_model_with_nothing_to_patch_comes_back_unchanged():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=8, padding_mode="reflect")
    )
    x = torch.randn(1, 3, 12, 12)
    want = model(x)
    assert vitkern.patch(model) is model
    assert vitkern.patched(model) == []
    assert all("forward" not in module.__dict__ for module in model.modules())
    assert torch.equal(model(x), want)


def test_modules_left_alone():
    """An MLP-generated bias (CoAtNet rmlp) is not patched; the depthwise convs around it are."""
    model = timm.create_model(
        "coatnet_rmlp_nano_rw_224", img_size=64, embed_dim=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_width=(16, 16)
    )
    vitkern.patch(model)
    names = {qualified for qualified, _ in vitkern.patched(model)}
    attention = {qualified for qualified, module in model.named_modules() if type(module).__name__ == "Attention2d"}
    assert attention and not attention & names
    assert names


def test_attention_dropout_in_training_runs_own_forward():
    """Dropout on the attention weights in training: the module's own forward (same random stream, same output);
    in eval the fused op."""
    model = timm.create_model("swin_tiny_patch4_window7_224", attn_drop_rate=0.3, **SMALL_SWIN)
    randomise(model)
    reference_model = copy.deepcopy(model)
    vitkern.patch(model)
    x = image("swin_tiny_patch4_window7_224")
    torch.manual_seed(1)
    out = model.train()(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, reference_model.train()(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference_model.eval()(x), **TOL)


def test_train_eval_switches_and_load_state_dict_after_patching():
    model = build("levit_128s")
    reference_model = copy.deepcopy(model)
    vitkern.patch(model)
    x = image("levit_128s")
    with torch.no_grad():
        model.eval()(x)
        reference_model.eval()(x)  # fills timm's eval-mode bias cache
        state = build("levit_128s").state_dict()
        model.load_state_dict(state)
        reference_model.load_state_dict(state)
        reference_model.train()  # a train() switch clears the cache, so the reference sees the new biases
        torch.testing.assert_close(model.eval()(x), reference_model.eval()(x), **TOL)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference_model(x), **TOL)
    compare(model, reference_model, image("levit_128s", 4), train=True)


def test_set_input_size_after_patching():
    model = build("swin_tiny_patch4_window7_224")
    reference_model = copy.deepcopy(model)
    vitkern.patch(model)
    for m in (model, reference_model):
        m.set_input_size(img_size=(64, 64), window_size=8)
    compare(model, reference_model, torch.randn(2, 3, 64, 64), train=True)


def test_patch_then_compile():
    model = build("swin_tiny_patch4_window7_224").eval()
    reference_model = copy.deepcopy(model)
    vitkern.patch(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = image("swin_tiny_patch4_window7_224")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference_model(x), **TOL)


def test_compiled_model_is_refused():
    model = build("convnext_tiny")
    with pytest.raises(TypeError, match="torch.compile"):
        vitkern.patch(torch.compile(model))
    model.compile()
    with pytest.raises(TypeError, match="torch.compile"):
        vitkern.patch(model)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        vitkern.patch("resnet")
    with pytest.raises(TypeError, match="attention"):
        vitkern.patch(nn.Linear(2, 2), attention=1)
