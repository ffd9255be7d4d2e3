"""vitkern.nn.RelPosAttention and vitkern.nn.LeViTAttention against the seed modules, written out below.

Each case loads the seed module's state_dict into the vitkern module and compares the output, the input gradient
and every parameter gradient, on the backends eager (the reference), auto (the CPU path on CPU tensors) and triton
(the Triton kernels; under the interpreter on CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from einops import rearrange

import vitkern
from vitkern.nn import LeViTAttention, RelPosAttention
from vitkern.testing import assert_close, large_allocations

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("eager", "auto", "triton")


# --- the seed modules ----------------------------------------------------------------------------------------


class SeedCoAtNetAttention(nn.Module):
    """``Attention`` of shared/seeds/coatnet_article.txt (meshgrid indexing spelled out, as its default)."""

    def __init__(self, inp, oup, image_size, heads=8, dim_head=32, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == inp)
        self.ih, self.iw = image_size
        self.heads = heads
        self.scale = dim_head**-0.5
        self.relative_bias_table = nn.Parameter(torch.zeros((2 * self.ih - 1) * (2 * self.iw - 1), heads))
        coords = torch.meshgrid((torch.arange(self.ih), torch.arange(self.iw)), indexing="ij")
        coords = torch.flatten(torch.stack(coords), 1)
        relative_coords = coords[:, :, None] - coords[:, None, :]
        relative_coords[0] += self.ih - 1
        relative_coords[1] += self.iw - 1
        relative_coords[0] *= 2 * self.iw - 1
        relative_coords = rearrange(relative_coords, "c h w -> h w c")
        relative_index = relative_coords.sum(-1).flatten().unsqueeze(1)
        self.register_buffer("relative_index", relative_index)
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(inp, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, oup), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x):
        qkv = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads), qkv)
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        relative_bias = self.relative_bias_table.gather(0, self.relative_index.repeat(1, self.heads))
        relative_bias = rearrange(relative_bias, "(h w) c -> 1 c h w", h=self.ih * self.iw, w=self.ih * self.iw)
        dots = dots + relative_bias
        attn = self.attend(dots)
        out = torch.matmul(attn, v)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.to_out(out)


class SeedLeViTAttention(nn.Module):
    """LeViT's ``Attention`` of shared/seeds/deepvit_deit_cait_t2t_crossvit_pit_levit_cvt_article.txt."""

    def __init__(self, dim, fmap_size, heads=8, dim_key=32, dim_value=64, dropout=0.0, dim_out=None, downsample=False):
        super().__init__()
        inner_dim_key = dim_key * heads
        inner_dim_value = dim_value * heads
        dim_out = dim if dim_out is None else dim_out
        self.heads = heads
        self.scale = dim_key**-0.5
        self.to_q = nn.Sequential(
            nn.Conv2d(dim, inner_dim_key, 1, stride=(2 if downsample else 1), bias=False),
            nn.BatchNorm2d(inner_dim_key),
        )
        self.to_k = nn.Sequential(nn.Conv2d(dim, inner_dim_key, 1, bias=False), nn.BatchNorm2d(inner_dim_key))
        self.to_v = nn.Sequential(nn.Conv2d(dim, inner_dim_value, 1, bias=False), nn.BatchNorm2d(inner_dim_value))
        self.attend = nn.Softmax(dim=-1)
        out_batch_norm = nn.BatchNorm2d(dim_out)
        nn.init.zeros_(out_batch_norm.weight)
        self.to_out = nn.Sequential(
            nn.GELU(), nn.Conv2d(inner_dim_value, dim_out, 1), out_batch_norm, nn.Dropout(dropout)
        )
        self.pos_bias = nn.Embedding(fmap_size * fmap_size, heads)
        q_range = torch.arange(0, fmap_size, step=(2 if downsample else 1))
        k_range = torch.arange(fmap_size)
        q_pos = torch.stack(torch.meshgrid(q_range, q_range, indexing="ij"), dim=-1)
        k_pos = torch.stack(torch.meshgrid(k_range, k_range, indexing="ij"), dim=-1)
        q_pos, k_pos = map(lambda t: rearrange(t, "i j c -> (i j) c"), (q_pos, k_pos))
        rel_pos = (q_pos[:, None, ...] - k_pos[None, :, ...]).abs()
        x_rel, y_rel = rel_pos.unbind(dim=-1)
        pos_indices = (x_rel * fmap_size) + y_rel
        self.register_buffer("pos_indices", pos_indices)

    def apply_pos_bias(self, fmap):
        bias = self.pos_bias(self.pos_indices)
        bias = rearrange(bias, "i j h -> () h i j")
        return fmap + (bias / self.scale)

    def forward(self, x):
        h = self.heads
        q = self.to_q(x)
        y = q.shape[2]
        qkv = (q, self.to_k(x), self.to_v(x))
        q, k, v = map(lambda t: rearrange(t, "b (h d) ... -> b h (...) d", h=h), qkv)
        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        dots = self.apply_pos_bias(dots)
        attn = self.attend(dots)
        out = torch.einsum("b h i j, b h j d -> b h i d", attn, v)
        out = rearrange(out, "b h (x y) d -> b (h d) x y", h=h, y=y)
        return self.to_out(out)


# --- helpers -------------------------------------------------------------------------------------------------


def randomize(module: nn.Module) -> nn.Module:
    """Random parameters and BatchNorm statistics, so that zero-initialised tables and BN weights test something."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.4)
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.2)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return module


def check_against_seed(
    module: nn.Module, seed: nn.Module, x: torch.Tensor, backend: str, forward: nn.Module | None = None
) -> None:
    """Output, input gradient, every parameter gradient and the BatchNorm statistics of ``module`` (on ``backend``,
    called through ``forward`` when given, e.g. its compiled form) against ``seed``."""
    x_seed = x.clone().requires_grad_()
    x_mod = x.clone().requires_grad_()
    expected = seed(x_seed)
    with vitkern.backend(backend):
        actual = (module if forward is None else forward)(x_mod)
    assert_close(actual, expected, name="output")
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    with vitkern.backend(backend):
        actual.backward(grad_out)
    assert_close(x_mod.grad, x_seed.grad, name="x.grad")
    seed_params = dict(seed.named_parameters())
    for name, param in module.named_parameters():
        assert param.grad is not None, f"{name}: no gradient"
        assert_close(param.grad, seed_params[name].grad, name=f"{name}.grad")
    seed_buffers = dict(seed.named_buffers())
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            assert_close(buf, seed_buffers[name], name=name)
        else:
            assert torch.equal(buf, seed_buffers[name]), name


def rel_pos_pair(inp, oup, image_size, num_heads, head_dim):
    seed = randomize(SeedCoAtNetAttention(inp, oup, image_size, num_heads, head_dim)).to(DEVICE)
    module = RelPosAttention(inp, oup, image_size, num_heads=num_heads, head_dim=head_dim).to(DEVICE)
    module.load_state_dict(seed.state_dict(), strict=True)
    return seed, module


def levit_pair(dim, fmap_size, heads, dim_key, dim_value, dim_out=None, downsample=False):
    seed = SeedLeViTAttention(
        dim, fmap_size, heads=heads, dim_key=dim_key, dim_value=dim_value, dim_out=dim_out, downsample=downsample
    )
    seed = randomize(seed).to(DEVICE)
    module = LeViTAttention(
        dim, fmap_size, num_heads=heads, key_dim=dim_key, value_dim=dim_value, dim_out=dim_out, downsample=downsample
    ).to(DEVICE)
    module.load_state_dict(seed.state_dict(), strict=True)
    return seed, module


# --- RelPosAttention -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "inp, oup, image_size, num_heads, head_dim",
    [
        (16, 24, (4, 4), 2, 8),
        (12, 12, (2, 3), 3, 16),
        (8, 8, (3, 3), 1, 8),  # num_heads == 1 and head_dim == inp: to_out is the identity
        (16, 32, (7, 7), 1, 32),
    ],
)
def test_rel_pos_attention_matches_seed(backend, inp, oup, image_size, num_heads, head_dim):
    seed, module = rel_pos_pair(inp, oup, image_size, num_heads, head_dim)
    x = torch.randn(2, image_size[0] * image_size[1], inp, device=DEVICE)
    check_against_seed(module, seed, x, backend)


def test_rel_pos_attention_identity_projection_has_no_out_parameters():
    module = RelPosAttention(8, 8, (3, 3), num_heads=1, head_dim=8)
    assert isinstance(module.to_out, nn.Identity)
    assert sorted(name for name, _ in module.named_parameters()) == ["relative_bias_table", "to_qkv.weight"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [8, 32])
def test_rel_pos_attention_inference_matches_seed(backend, head_dim):
    """Without autograd; on "auto" with CPU tensors head dim 32 takes the CPU path's SDPA branch."""
    seed, module = rel_pos_pair(16, 16, (4, 4), 2, head_dim)
    seed.eval()
    module.eval()
    x = torch.randn(3, 16, 16, device=DEVICE)
    with torch.no_grad(), vitkern.backend(backend):
        assert_close(module(x), seed(x))


def test_rel_pos_attention_old_keywords_warn_and_build_the_same_module():
    """``heads=`` and ``dim_head=`` (the seed's names) still work for one release, each with a DeprecationWarning
    naming its replacement, and build the module ``num_heads=`` / ``head_dim=`` build."""
    torch.manual_seed(0)
    new = RelPosAttention(16, 24, (4, 4), num_heads=2, head_dim=8)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning) as record:
        old = RelPosAttention(16, 24, (4, 4), heads=2, dim_head=8)
    messages = sorted(str(w.message) for w in record if issubclass(w.category, DeprecationWarning))
    assert len(messages) == 2
    assert "dim_head= is deprecated, use head_dim=" in messages[0]
    assert "heads= is deprecated, use num_heads=" in messages[1]
    assert all(w.filename == __file__ for w in record), "the warnings point at the caller"
    assert (old.num_heads, old.head_dim) == (new.num_heads, new.head_dim) == (2, 8)
    assert old.state_dict().keys() == new.state_dict().keys()
    for key, value in new.state_dict().items():
        assert torch.equal(old.state_dict()[key], value), key
    with pytest.warns(DeprecationWarning, match="use num_heads"):
        assert old.heads == 2
    with pytest.warns(DeprecationWarning, match="use head_dim"):
        assert old.dim_head == 8
    with pytest.raises(TypeError, match="heads.*num_heads"):
        RelPosAttention(16, 24, (4, 4), num_heads=4, heads=2)
    with pytest.raises(TypeError, match="heads.*num_heads"):
        RelPosAttention(16, 24, (4, 4), num_heads=8, heads=2)  # the default value passed explicitly counts too


def test_levit_attention_takes_the_seeds_keywords_with_a_deprecation_warning():
    torch.manual_seed(0)
    new = LeViTAttention(16, 4, num_heads=2, key_dim=8, value_dim=12)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning) as record:
        old = LeViTAttention(16, 4, heads=2, dim_key=8, dim_value=12)
    messages = sorted(str(w.message) for w in record if issubclass(w.category, DeprecationWarning))
    assert [m.split(":")[1].strip() for m in messages] == [
        "the keyword dim_key= is deprecated, use key_dim= (timm's name)",
        "the keyword dim_value= is deprecated, use value_dim= (timm's name)",
        "the keyword heads= is deprecated, use num_heads= (timm's name)",
    ]
    assert all(w.filename == __file__ for w in record), "the warnings point at the caller"
    assert (old.num_heads, old.key_dim, old.value_dim) == (new.num_heads, new.key_dim, new.value_dim) == (2, 8, 12)
    for key, value in new.state_dict().items():
        assert torch.equal(old.state_dict()[key], value), key
    with pytest.warns(DeprecationWarning, match="use num_heads"):
        assert old.heads == 2
    with pytest.raises(TypeError, match="dim_key.*key_dim"):
        LeViTAttention(16, 4, key_dim=8, dim_key=8)


def test_rel_pos_attention_does_not_modify_input():
    _, module = rel_pos_pair(16, 24, (4, 4), 2, 8)
    x = torch.randn(2, 16, 16, device=DEVICE)
    x_copy = x.clone()
    module(x).sum().backward()
    assert torch.equal(x, x_copy)


# --- LeViTAttention ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dim, fmap_size, heads, dim_key, dim_value, dim_out, downsample",
    [
        (16, 4, 2, 8, 16, None, False),
        (16, 5, 2, 16, 32, None, False),
        (16, 7, 2, 16, 64, 24, True),  # shrink attention, odd map: 4x4 queries on the 7x7 keys
        (12, 4, 3, 8, 16, 20, True),
    ],
)
def test_levit_attention_matches_seed(backend, dim, fmap_size, heads, dim_key, dim_value, dim_out, downsample):
    seed, module = levit_pair(dim, fmap_size, heads, dim_key, dim_value, dim_out, downsample)
    x = torch.randn(2, dim, fmap_size, fmap_size, device=DEVICE)
    check_against_seed(module, seed, x, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("downsample", [False, True])
def test_levit_attention_eval_matches_seed(backend, downsample):
    """Eval mode: running BatchNorm statistics; on "auto" with CPU tensors, the cached gathered bias."""
    seed, module = levit_pair(16, 7, 2, 16, 32, 16, downsample)
    seed.eval()
    module.eval()
    x = torch.randn(2, 16, 7, 7, device=DEVICE)
    with torch.no_grad(), vitkern.backend(backend):
        assert_close(module(x), seed(x))


def test_levit_attention_output_shape_of_shrink_attention():
    module = LeViTAttention(16, 7, num_heads=2, key_dim=8, value_dim=16, dim_out=24, downsample=True)
    assert module(torch.randn(2, 16, 7, 7)).shape == (2, 24, 4, 4)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the bias cache belongs to the CPU path (auto backend, CPU tensors)")
def test_levit_eval_cache_is_reused_and_follows_parameter_updates():
    seed, module = levit_pair(16, 4, 2, 8, 16)
    seed.eval()
    module.eval()
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad(), vitkern.backend("auto"):
        before = module(x)
        cached = module._bias_cache[2]
        module(x)
        assert module._bias_cache[2] is cached, "the cached bias was recomputed without a parameter change"

        delta = torch.randn_like(module.pos_bias.weight)
        module.pos_bias.weight.add_(delta)
        seed.pos_bias.weight.add_(delta)
        after = module(x)
        assert module._bias_cache[2] is not cached
        assert_close(after, seed(x), name="output after an in-place update")
        assert (after - before).abs().max() > 1e-3

        other = randomize(SeedLeViTAttention(16, 4, heads=2, dim_key=8, dim_value=16)).eval()
        module.load_state_dict(other.state_dict())
        assert_close(module(x), other(x), name="output after load_state_dict")

        module.pos_bias.weight = nn.Parameter(seed.pos_bias.weight.clone())
        module.load_state_dict(seed.state_dict())
        assert_close(module(x), seed(x), name="output after a new Parameter")

    module.train()
    assert module._bias_cache is None


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the bias cache belongs to the CPU path (auto backend, CPU tensors)")
def test_levit_eval_cache_after_optimizer_step():
    seed, module = levit_pair(16, 4, 2, 8, 16)
    x = torch.randn(2, 16, 4, 4)
    module.eval()
    seed.eval()
    with torch.no_grad():
        module(x)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module.train()
    module(x).square().mean().backward()
    optimizer.step()
    seed.load_state_dict(module.state_dict(), strict=False)
    module.eval()
    with torch.no_grad():
        assert_close(module(x), seed(x))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the bias cache belongs to the CPU path (auto backend, CPU tensors)")
def test_levit_eval_with_gradients_bypasses_the_cache():
    """Eval mode with autograd on (fine-tuning with frozen BatchNorm): pos_bias still gets its gradient."""
    seed, module = levit_pair(16, 4, 2, 8, 16, downsample=True)
    seed.eval()
    module.eval()
    check_against_seed(module, seed, torch.randn(2, 16, 4, 4), "auto")
    assert module._bias_cache is None


@pytest.mark.parametrize("kind", ["rel_pos", "levit"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_modules_compile_without_graph_breaks(backend, kind):
    """torch.compile(fullgraph=True) traces the modules with autograd: through the custom op (triton) or, on "auto"
    with CPU tensors, through the CPU path's plain ops."""
    if kind == "rel_pos":
        seed, module = rel_pos_pair(16, 16, (4, 4), 2, 8)
        x = torch.randn(2, 16, 16, device=DEVICE)
    else:
        seed, module = levit_pair(16, 4, 2, 8, 16, downsample=True)
        x = torch.randn(2, 16, 4, 4, device=DEVICE)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    check_against_seed(module, seed, x, backend, forward=compiled)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the profiler's allocation records are taken on CPU tensors")
@pytest.mark.parametrize("kind", ["rel_pos", "levit"])
def test_fused_modules_never_allocate_a_score_matrix(kind):
    """On the triton backend neither module allocates B*heads*Nq*Nk fp32 elements or more, forward or backward (every
    other buffer of these shapes is smaller); on eager, which materialises the scores, the same check finds one."""
    batch, heads, side = 1, 2, 5
    tokens = side * side
    if kind == "rel_pos":
        _, module = rel_pos_pair(16, 16, (side, side), heads, 8)
        x = torch.randn(batch, tokens, 16)
    else:
        _, module = levit_pair(16, side, heads, 8, 8)
        x = torch.randn(batch, 16, side, side)
    threshold = batch * heads * tokens * tokens * x.element_size()

    def forward_backward(backend: str) -> None:
        with vitkern.backend(backend):
            module(x).sum().backward()

    assert large_allocations(lambda: forward_backward("triton"), threshold) == []
    assert large_allocations(lambda: forward_backward("eager"), threshold) != []


# --- state_dict compatibility --------------------------------------------------------------------------------


def test_rel_pos_state_dict_round_trip():
    seed, module = rel_pos_pair(16, 24, (4, 4), 2, 8)
    assert set(module.state_dict()) == set(seed.state_dict()) - {"relative_index"}
    restored = SeedCoAtNetAttention(16, 24, (4, 4), 2, 8).to(DEVICE)
    result = restored.load_state_dict(module.state_dict(), strict=False)
    assert result.missing_keys == ["relative_index"] and result.unexpected_keys == []
    x = torch.randn(2, 16, 16, device=DEVICE)
    assert_close(restored(x), seed(x))


def test_levit_state_dict_round_trip():
    seed, module = levit_pair(16, 7, 2, 8, 16, 24, downsample=True)
    assert set(module.state_dict()) == set(seed.state_dict()) - {"pos_indices"}
    restored = SeedLeViTAttention(16, 7, heads=2, dim_key=8, dim_value=16, dim_out=24, downsample=True).to(DEVICE)
    result = restored.load_state_dict(module.state_dict(), strict=False)
    assert result.missing_keys == ["pos_indices"] and result.unexpected_keys == []
    restored.eval()
    seed.eval()
    x = torch.randn(2, 16, 7, 7, device=DEVICE)
    with torch.no_grad():
        assert_close(restored(x), seed(x))


def test_nested_seed_state_dict_loads_strictly():
    """The index buffers are dropped under any prefix, as inside a model."""
    seed = nn.Sequential(SeedCoAtNetAttention(8, 8, (2, 2), 2, 4), SeedLeViTAttention(8, 2, heads=2, dim_key=4))
    module = nn.Sequential(RelPosAttention(8, 8, (2, 2), 2, 4), LeViTAttention(8, 2, num_heads=2, key_dim=4))
    module.load_state_dict(seed.state_dict(), strict=True)


def test_mismatched_saved_index_is_an_error():
    seed = SeedCoAtNetAttention(16, 16, (4, 4), 2, 8)
    state = seed.state_dict()
    state["relative_index"] = state["relative_index"].flip(0)
    with pytest.raises(RuntimeError, match="relative_index"):
        RelPosAttention(16, 16, (4, 4), 2, 8).load_state_dict(state)
    levit = SeedLeViTAttention(16, 4, heads=2, dim_key=8, downsample=True).state_dict()
    with pytest.raises(RuntimeError, match="pos_indices"):
        LeViTAttention(16, 4, num_heads=2, key_dim=8, downsample=False).load_state_dict(levit)


# --- bad input -----------------------------------------------------------------------------------------------


def test_rel_pos_attention_wrong_token_count():
    module = RelPosAttention(16, 16, (4, 4), num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"x: expected \(batch, 16, 16\).*got \(2, 15, 16\)"):
        module(torch.randn(2, 15, 16))


def test_rel_pos_attention_wrong_channels_and_rank():
    module = RelPosAttention(16, 16, (4, 4), num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"got \(2, 16, 12\)"):
        module(torch.randn(2, 16, 12))
    with pytest.raises(ValueError, match=r"got \(2, 16, 4, 4\)"):
        module(torch.randn(2, 16, 4, 4))


def test_levit_attention_wrong_feature_map():
    module = LeViTAttention(16, 7, heads=2, dim_key=8, dim_value=16)
    with pytest.raises(ValueError, match=r"x: expected \(batch, 16, 7, 7\).*got \(2, 16, 6, 6\)"):
        module(torch.randn(2, 16, 6, 6))
    with pytest.raises(ValueError, match=r"got \(2, 8, 7, 7\)"):
        module(torch.randn(2, 8, 7, 7))
    with pytest.raises(ValueError, match=r"got \(2, 49, 16\)"):
        module(torch.randn(2, 49, 16))
