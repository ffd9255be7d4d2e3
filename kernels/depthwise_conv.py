"""Triton kernels of :func:`vitkern.ops.depthwise_conv2d` and their launchers.

The launchers implement the kernel contract in :mod:`vitkern.kernels.contract`::

    depthwise_conv2d_fwd(x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z)
        -> (y, z)
    depthwise_conv2d_bwd(dy, x, weight, z, scale, stride, padding, dilation, activation, output_mask)
        -> (dx, dweight, dbias, dscale, dshift)

Kernels:

* ``_dwconv_fwd_kernel``: the NCHW convolution and the whole epilogue where the row kernel does not apply, one
  program per tile of output pixels of one channel and image; a runtime loop over blocks of BLOCK_T taps gathers
  a (taps, pixels, channels) tile per step, so the kernel size is not a compile-time constant.
* ``_dwconv_fwd_cl_kernel``: the same for channels_last, one tap at a time over (pixels, channels) tiles whose
  channels are contiguous: one vector load per pixel and run of channels, one weight vector per tap. It also gives
  dx of channels_last at stride 1, the convolution of gz with the weights flipped.
* ``_dwconv_fwd_rows_kernel``: the same for NCHW fp16/bf16 at stride 1 with "same" padding and a square kernel of
  3, 5, 7 or 9, on tensor cores: a 16 x 32 output tile is one product of the input rows it reads, laid side by
  side, and a banded weight matrix built once per program for all the images it runs. It also gives dx there, the
  convolution of gz (stored in x's dtype) with the weights flipped.
* ``_dwconv_bwd_epilogue_kernel``: ``gz = dy * scale * act'(z)`` (the gradient of the pre-activation) and
  per-channel partial sums of gz (bias), ``dy * act(z)`` (scale) and dy (shift) over a fixed split of the
  (image, pixel block) range; the partials are summed in a fixed order afterwards, so the result is deterministic.
* ``_dwconv_bwd_input_kernel``: dx, the transposed depthwise convolution of gz, stride and dilation aware.
* ``_dwconv_bwd_weight_kernel``: dweight; a program owns a block of taps (x a block of channels) and one split of
  the (image, pixel block) range, loads each gz block once and gathers x for all its taps. Partials per split are
  summed in a fixed order: no float atomics, bitwise reproducible.

The backward kernels read and write through strides, so NCHW and channels_last tensors take the same path; the
``CHANNELS_LAST`` switch only fixes which stride is 1. Accumulation is fp32 whatever the storage dtype; the
backward's gz buffer has the storage dtype, as dy.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import triton
import triton.language as tl

from vitkern.kernels._specs import REPORT_DTYPES, TRITON_DTYPES, KernelSpec
from vitkern.kernels.contract import ACTIVATION_CODES, memory_format, output_size

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# (BLOCK_T, BLOCK_P, BLOCK_C, num_warps): the (taps, pixels, channels) tile of the general forward (NCHW), dx and
# dweight kernels. NCHW takes the first whose BLOCK_P covers the image (else the last), channels_last the first
# whose BLOCK_C covers the channels (else the last).
NCHW_TILES = ((16, 64, 1, 2), (16, 128, 1, 4))
CHANNELS_LAST_TILES = ((8, 16, 16, 4), (16, 4, 32, 4))
# (BLOCK_P, BLOCK_C, num_warps) of the channels_last forward (_dwconv_fwd_cl_kernel), by whether the channels are
# a multiple of CL_FWD_ALIGN (then triton compiles the strides as multiples of 16 and the loads as 16-byte vectors;
# the element-wise loads of other channel counts spill at 64 channels).
CL_FWD_TILES = {True: (64, 64, 4), False: (64, 16, 4)}
CL_FWD_ALIGN = 16
CL_FWD_MAX_REGISTERS = 255  # left to its own heuristics ptxas caps the fp32 64 x 64 tile at 128 and spills on sm_80
CL_FWD_ALIGNED = ("C", "stride_xn", "stride_xh", "stride_xw", "stride_yn", "stride_yh", "stride_yw")
# The forward's tensor-core row kernel (_dwconv_fwd_rows_kernel), which also gives dx from gz for the same calls: NCHW
# fp16/bf16 at stride 1, dilation 1 and "same" padding with a square kernel of one of ROW_SIZES. (BLOCK_R, BLOCK_W,
# num_warps) = ROW_TILE, tiles of BLOCK_R x BLOCK_W outputs. Where the width is a multiple of ROW_ALIGN the input
# windows start ROW_ALIGN columns left of the tile, on ROW_ALIGN-element boundaries, and rows load in vectors of
# that many elements; elsewhere the windows start where the padding says (the narrowest) and load element by
# element (:func:`row_window`). A program runs over up to ROW_IMAGES images of its tile (its weight matrix built
# once for all of them), fewer where the grid would otherwise have under ROW_MIN_PROGRAMS programs.
ROW_SIZES = (3, 5, 7, 9)
ROW_TILE = (16, 32, 4)
ROW_ALIGN = 4
ROW_IMAGES = 16
ROW_MIN_PROGRAMS = 1024
ROW_DTYPES = (torch.float16, torch.bfloat16)
# (BLOCK_P, BLOCK_C, num_warps) of the epilogue backward, by layout (channels_last at 16 x 32: at 32 x 32 the 2-byte
# gz spilled on sm_90 with ReLU, and on triton 3.6 in fp32 too).
EPILOGUE_BWD_TILE = {False: (256, 1, 4), True: (16, 32, 4)}
# The reductions split the (image, pixel block) range until the grid has about TARGET_PROGRAMS programs, keeping
# at least MIN_SPLIT_ITERATIONS iterations per split.
TARGET_PROGRAMS = 1024
MIN_SPLIT_ITERATIONS = 4


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z): 0 identity, 1 GELU (erf), 2 ReLU."""
    if ACTIVATION == 1:
        out = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACTIVATION == 2:
        out = tl.maximum(z, 0.0)
    else:
        out = z
    return out


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """act'(z) for ACTIVATION 1 (GELU, erf) or 2 (ReLU, 0 at z = 0 as PyTorch)."""
    if ACTIVATION == 1:
        out = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    else:
        out = tl.where(z > 0.0, 1.0, 0.0)
    return out


@triton.jit
def _layout_strides(stride_c, stride_w, CHANNELS_LAST: tl.constexpr):
    """(channel stride, column stride) of a tensor, the one its layout makes 1 taken as 1: the channel stride for
    channels_last, the column stride for NCHW."""
    if CHANNELS_LAST:
        strides = 1, stride_w
    else:
        strides = stride_c, 1
    return strides


@triton.jit
def _pixel_tile(pid, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split a 1-D program id into image n, a block of BLOCK_P pixels of the H x W image (rows, columns, in-bounds
    mask) and a block of BLOCK_C channels (offsets, mask); pixel blocks vary fastest, then channel blocks, then
    images."""
    num_p = tl.cdiv(H * W, BLOCK_P)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_p = pid % num_p
    rest = pid // num_p
    pid_c = rest % num_c
    n = rest // num_c
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    row = p // W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, row, p - row * W, p < H * W, c, c < C


@triton.jit
def _image_offsets(n, c, row, col, stride_n, stride_c, stride_h, stride_w):
    """(pixels, channels) offsets of channels c (BLOCK_C,) at pixels (row, col) (BLOCK_P,) of image n, int64."""
    return n.to(tl.int64) * stride_n + (c * stride_c)[None, :] + (row * stride_h + col * stride_w)[:, None]


@triton.jit
def _taps(t0, KH, KW, BLOCK_T: tl.constexpr):
    """Taps t0 .. t0 + BLOCK_T - 1 of a KH x KW kernel, row-major: (t, kh, kw, mask), each (BLOCK_T, 1, 1)."""
    t = t0 + tl.arange(0, BLOCK_T)
    kh = t // KW
    kw = t - kh * KW
    return t[:, None, None], kh[:, None, None], kw[:, None, None], (t < KH * KW)[:, None, None]


@triton.jit
def _tap_weights(w_base, t, t_mask, c_mask, stride_wt):
    """The weights of taps t (as :func:`_taps`) for the channels w_base points at, fp32, (BLOCK_T, 1, BLOCK_C)."""
    return tl.load(w_base + t * stride_wt, mask=t_mask & c_mask[None, None, :], other=0.0).to(tl.float32)


@triton.jit
def _dwconv_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    res_ptr,
    y_ptr,
    z_ptr,
    C,
    H,
    W,
    OH,
    OW,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
    stride_wc,
    stride_wt,
    KH,
    KW,
    STRIDE_H,
    STRIDE_W,
    PAD_T,
    PAD_L,
    DIL_H,
    DIL_W,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SAVE_Z: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = act(conv(x, w) + bias) * scale + shift + residual; z = conv(x, w) + bias when SAVE_Z.

    Grid: (N * cdiv(C, BLOCK_C) * cdiv(OH * OW, BLOCK_P),). x_ptr: (N, C, H, W); w_ptr: (C, KH * KW) read through
    (stride_wc, stride_wt); bias_ptr, scale_ptr, shift_ptr: (C,); res_ptr, y_ptr, z_ptr: (N, C, OH, OW), all three
    with the strides stride_y*, NCHW: stride_xw and stride_yw are taken as 1. Each step of the tap loop gathers a
    (BLOCK_T, BLOCK_P, BLOCK_C) tile; the tap axis is summed at the end.
    """
    n, oh, ow, p_mask, c, c_mask = _pixel_tile(tl.program_id(0), OH, OW, C, BLOCK_P, BLOCK_C)
    stride_xc, stride_xw = _layout_strides(stride_xc, stride_xw, False)
    stride_yc, stride_yw = _layout_strides(stride_yc, stride_yw, False)
    x_base = x_ptr + n.to(tl.int64) * stride_xn + (c * stride_xc)[None, None, :]
    w_base = w_ptr + (c * stride_wc)[None, None, :]
    ih0 = (oh * STRIDE_H - PAD_T)[None, :, None]
    iw0 = (ow * STRIDE_W - PAD_L)[None, :, None]
    pc_mask = p_mask[None, :, None] & c_mask[None, None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_P, BLOCK_C), dtype=tl.float32)
    for t0 in range(0, KH * KW, BLOCK_T):
        t, kh, kw, t_mask = _taps(t0, KH, KW, BLOCK_T)
        ih = ih0 + kh * DIL_H
        iw = iw0 + kw * DIL_W
        ok = pc_mask & t_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_base + ih * stride_xh + iw * stride_xw, mask=ok, other=0.0)
        acc += xv.to(tl.float32) * _tap_weights(w_base, t, t_mask, c_mask, stride_wt)
    y_off = _image_offsets(n, c, oh, ow, stride_yn, stride_yc, stride_yh, stride_yw)
    _fwd_epilogue(
        tl.sum(acc, axis=0),
        c[None, :],
        c_mask[None, :],
        bias_ptr,
        scale_ptr,
        shift_ptr,
        res_ptr,
        y_ptr,
        z_ptr,
        y_off,
        p_mask[:, None] & c_mask[None, :],
        HAS_BIAS,
        HAS_SCALE,
        HAS_SHIFT,
        HAS_RESIDUAL,
        ACTIVATION,
        SAVE_Z,
    )


@triton.jit
def _dwconv_fwd_cl_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    res_ptr,
    y_ptr,
    z_ptr,
    C,
    H,
    W,
    OH,
    OW,
    stride_xn,
    stride_xh,
    stride_xw,
    stride_yn,
    stride_yh,
    stride_yw,
    KH,
    KW,
    STRIDE_H,
    STRIDE_W,
    PAD_T,
    PAD_L,
    DIL_H,
    DIL_W,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SAVE_Z: tl.constexpr,
    EVEN_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The forward of :func:`_dwconv_fwd_kernel` for channels_last x and y (channel stride 1), one tap at a time.

    Grid as there, tiles of (BLOCK_P output pixels, BLOCK_C channels). Each tap reads one (BLOCK_P, BLOCK_C) input
    tile, a run of contiguous channels per pixel (16-byte vectors where C is a multiple of 16), and one (BLOCK_C,)
    weight vector: w_ptr is the tap-major fp32 copy (KH * KW, C), contiguous. The pixel offsets and bounds are
    computed once per program; a tap adds one offset, the same for every pixel, and its row and column checks.
    """
    n, oh, ow, p_mask, c, c_mask = _pixel_tile(tl.program_id(0), OH, OW, C, BLOCK_P, BLOCK_C)
    x_base = x_ptr + n.to(tl.int64) * stride_xn + c[None, :]
    ih0 = oh * STRIDE_H - PAD_T
    iw0 = ow * STRIDE_W - PAD_L
    pixel = (ih0 * stride_xh + iw0 * stride_xw)[:, None]
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        ih = ih0 + kh * DIL_H
        row_ok = p_mask & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = iw0 + kw * DIL_W
            ok = (row_ok & (iw >= 0) & (iw < W))[:, None]
            tap = kh * DIL_H * stride_xh + kw * DIL_W * stride_xw
            if EVEN_C:
                xv = tl.load(x_base + pixel + tap, mask=ok, other=0.0)
                wv = tl.load(w_ptr + (kh * KW + kw) * C + c)
            else:
                xv = tl.load(x_base + pixel + tap, mask=ok & c_mask[None, :], other=0.0)
                wv = tl.load(w_ptr + (kh * KW + kw) * C + c, mask=c_mask, other=0.0)
            acc += xv.to(tl.float32) * wv[None, :]
    y_off = _image_offsets(n, c, oh, ow, stride_yn, 1, stride_yh, stride_yw)
    _fwd_epilogue(
        acc,
        c[None, :],
        c_mask[None, :],
        bias_ptr,
        scale_ptr,
        shift_ptr,
        res_ptr,
        y_ptr,
        z_ptr,
        y_off,
        p_mask[:, None] & c_mask[None, :],
        HAS_BIAS,
        HAS_SCALE,
        HAS_SHIFT,
        HAS_RESIDUAL,
        ACTIVATION,
        SAVE_Z,
    )


@triton.jit
def _fwd_epilogue(
    out,
    c,
    c_mask,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    res_ptr,
    y_ptr,
    z_ptr,
    y_off,
    mask,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SAVE_Z: tl.constexpr,
):
    """Store act(out + bias) * scale + shift + residual at y_off (and out + bias as z when SAVE_Z); out is the fp32
    convolution, c the channels it belongs to (broadcastable to it, c_mask alike), mask the outputs in bounds."""
    if HAS_BIAS:
        out += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if SAVE_Z:
        tl.store(z_ptr + y_off, out.to(z_ptr.dtype.element_ty), mask=mask)
    out = _activation(out, ACTIVATION)
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        out += tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _toeplitz_chunk(w_plane, KH, KW, PAD_L, START: tl.constexpr, SIZE: tl.constexpr, K_W: tl.constexpr, BLOCK_W):
    """Rows START .. START + SIZE - 1 of the row kernel's weight matrix T (KH * K_W, BLOCK_W): row k = kh * K_W + u
    takes input column iw0 + u for output column ow0 + j through tap kw = u - j + PAD_L - (K_W - BLOCK_W) // 2,
    T[k, j] = w[kh, kw], zero where kw or kh is off the kernel."""
    k = START + tl.arange(0, SIZE)
    kh = k // K_W
    kw = (k - kh * K_W)[:, None] - tl.arange(0, BLOCK_W)[None, :] + (PAD_L - (K_W - BLOCK_W) // 2)
    ok = (kh < KH)[:, None] & (kw >= 0) & (kw < KW)
    return tl.load(w_plane + (kh * KW)[:, None] + kw, mask=ok, other=0.0)


@triton.jit
def _input_chunk(
    x_plane, ih0, iw0, H, W, stride_xh, KH, START: tl.constexpr, SIZE: tl.constexpr, K_W: tl.constexpr, BLOCK_R
):
    """Columns START .. START + SIZE - 1 of the row kernel's input matrix X (BLOCK_R, KH * K_W): X[r, kh * K_W + u] =
    x[ih0 + r + kh, iw0 + u], zero outside the image (and for kh >= KH)."""
    k = START + tl.arange(0, SIZE)
    kh = k // K_W
    iw = iw0 + k - kh * K_W
    ih = ih0 + tl.arange(0, BLOCK_R)[:, None] + kh[None, :]
    ok = (ih >= 0) & (ih < H) & ((iw >= 0) & (iw < W) & (kh < KH))[None, :]
    return tl.load(x_plane + ih * stride_xh + iw[None, :], mask=ok, other=0.0)


@triton.jit
def _dwconv_fwd_rows_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    res_ptr,
    y_ptr,
    z_ptr,
    N,
    C,
    H,
    W,
    OH,
    OW,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_wc,
    images_per_program,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SAVE_Z: tl.constexpr,
    PAD_T: tl.constexpr,
    PAD_L: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ALIGN: tl.constexpr,
    VEC: tl.constexpr,
):
    """The forward of :func:`_dwconv_fwd_kernel` for NCHW fp16/bf16 at stride 1 and dilation 1, KH x KW and the
    padding known at compile time, on tensor cores: a tile of output rows is one matrix product per image.

    Grid: (C * cdiv(OH, BLOCK_R) * cdiv(OW, BLOCK_W), cdiv(N, images_per_program)). A program owns output rows
    oh0 .. oh0 + BLOCK_R - 1 and columns ow0 .. ow0 + BLOCK_W - 1 of channel c and runs over its images. The input
    window of each kernel row kh, columns iw0 = ow0 - ALIGN .. iw0 + K_W - 1 (K_W = BLOCK_W + 2 * ALIGN: every
    column the tile reads, as PAD_L and KW - 1 - PAD_L are at most ALIGN), is laid side by side along K:
    ``y[oh0 + r, ow0 + j] = (X @ T)[r, j]`` with X[r, kh * K_W + u] = x[oh0 - PAD_T + r + kh, iw0 + u] and T the
    banded (Toeplitz) weight matrix of :func:`_toeplitz_chunk`. T depends on the channel only: it is built once per
    program and stays in registers across the images, so a step reads the input tile (in vectors of VEC elements,
    which the launcher passes where the width and ALIGN are multiples of VEC) and runs the product. K = KH * K_W,
    rounded up to a multiple of 16 (the extra rows zero), is cut into chunks of powers of two (at most one of each,
    below 512). The products of 2-byte values are exact
    in fp32 and accumulate in fp32; T is zero off the band, so an inf or NaN input reaches the outputs of its whole
    tile (0 * inf), as in an FFT or Winograd convolution; finite inputs give the direct sum. x_ptr: (N, C, H, W)
    with unit column stride; w_ptr: (C, KH * KW) rows of stride_wc; y_ptr, z_ptr, res_ptr: (N, C, OH, OW) with unit
    column stride and the strides stride_y*.
    """
    K_W: tl.constexpr = BLOCK_W + 2 * ALIGN
    # NCHW-contiguous x and y of a width that VEC divides: every row, plane and image starts on a VEC boundary
    # and a row's bounds split no vector. Written as multiples of VEC, which the compiler's alignment analysis
    # reads (the values are unchanged).
    W = W // VEC * VEC
    OW = OW // VEC * VEC
    stride_xn = stride_xn // VEC * VEC
    stride_xc = stride_xc // VEC * VEC
    stride_xh = stride_xh // VEC * VEC
    stride_yn = stride_yn // VEC * VEC
    stride_yc = stride_yc // VEC * VEC
    stride_yh = stride_yh // VEC * VEC
    K: tl.constexpr = (KH * K_W + 15) // 16 * 16
    tl.static_assert(K < 512)
    tl.static_assert(PAD_L <= ALIGN and KW - 1 - PAD_L <= ALIGN)
    S128: tl.constexpr = K & 256
    S64: tl.constexpr = S128 + (K & 128)
    S32: tl.constexpr = S64 + (K & 64)
    S16: tl.constexpr = S32 + (K & 32)
    pid = tl.program_id(0)
    num_w = tl.cdiv(OW, BLOCK_W)
    num_tiles = tl.cdiv(OH, BLOCK_R) * num_w
    c = pid // num_tiles
    tile = pid - c * num_tiles
    oh0 = (tile // num_w) * BLOCK_R
    ow0 = (tile - (tile // num_w) * num_w) * BLOCK_W
    ih0 = oh0 - PAD_T
    iw0 = ow0 - ALIGN
    w_plane = w_ptr + c * stride_wc
    if K & 256:
        t256 = _toeplitz_chunk(w_plane, KH, KW, PAD_L, 0, 256, K_W, BLOCK_W)
    if K & 128:
        t128 = _toeplitz_chunk(w_plane, KH, KW, PAD_L, S128, 128, K_W, BLOCK_W)
    if K & 64:
        t64 = _toeplitz_chunk(w_plane, KH, KW, PAD_L, S64, 64, K_W, BLOCK_W)
    if K & 32:
        t32 = _toeplitz_chunk(w_plane, KH, KW, PAD_L, S32, 32, K_W, BLOCK_W)
    if K & 16:
        t16 = _toeplitz_chunk(w_plane, KH, KW, PAD_L, S16, 16, K_W, BLOCK_W)
    oh = oh0 + tl.arange(0, BLOCK_R)
    ow = ow0 + tl.arange(0, BLOCK_W)
    y_pix = (oh * stride_yh)[:, None] + ow[None, :]
    y_mask = (oh < OH)[:, None] & (ow < OW)[None, :]
    n0 = tl.program_id(1) * images_per_program
    x_plane = x_ptr + n0.to(tl.int64) * stride_xn + c.to(tl.int64) * stride_xc
    y_plane = n0.to(tl.int64) * stride_yn + c.to(tl.int64) * stride_yc
    for _ in range(n0, tl.minimum(n0 + images_per_program, N)):
        acc = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
        if K & 256:
            acc = tl.dot(_input_chunk(x_plane, ih0, iw0, H, W, stride_xh, KH, 0, 256, K_W, BLOCK_R), t256, acc)
        if K & 128:
            acc = tl.dot(_input_chunk(x_plane, ih0, iw0, H, W, stride_xh, KH, S128, 128, K_W, BLOCK_R), t128, acc)
        if K & 64:
            acc = tl.dot(_input_chunk(x_plane, ih0, iw0, H, W, stride_xh, KH, S64, 64, K_W, BLOCK_R), t64, acc)
        if K & 32:
            acc = tl.dot(_input_chunk(x_plane, ih0, iw0, H, W, stride_xh, KH, S32, 32, K_W, BLOCK_R), t32, acc)
        if K & 16:
            acc = tl.dot(_input_chunk(x_plane, ih0, iw0, H, W, stride_xh, KH, S16, 16, K_W, BLOCK_R), t16, acc)
        _fwd_epilogue(
            acc,
            c,
            c < C,
            bias_ptr,
            scale_ptr,
            shift_ptr,
            res_ptr,
            y_ptr,
            z_ptr,
            y_plane + y_pix,
            y_mask,
            HAS_BIAS,
            HAS_SCALE,
            HAS_SHIFT,
            HAS_RESIDUAL,
            ACTIVATION,
            SAVE_Z,
        )
        x_plane += stride_xn
        y_plane += stride_yn


@triton.jit
def _dwconv_bwd_epilogue_kernel(
    dy_ptr,
    z_ptr,
    scale_ptr,
    gz_ptr,
    partial_ptr,
    N,
    C,
    P,
    OW,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
    iters_per_split,
    num_splits,
    HAS_SCALE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    STORE_GZ: tl.constexpr,
    REDUCE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """gz = dy * scale * act'(z), computed in fp32 and stored in gz_ptr's dtype (dy's), and per-split partial sums
    of gz, dy * act(z) and dy per channel (fp32).

    Grid: (cdiv(C, BLOCK_C) * num_splits,). dy_ptr, z_ptr, gz_ptr: (N, C, OH, OW) with strides stride_y*, P = OH * OW;
    scale_ptr: (C,); partial_ptr: (3, num_splits, C) fp32, rows bias, scale, shift. Split s covers the (image, pixel
    block) iterations [s * iters_per_split, (s + 1) * iters_per_split).
    """
    pid = tl.program_id(0)
    split = pid % num_splits
    c = (pid // num_splits) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if CHANNELS_LAST:
        chan = c[None, :]
    else:
        chan = c[None, :] * stride_yc
    if HAS_SCALE:
        scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    num_p = tl.cdiv(P, BLOCK_P)
    start = split * iters_per_split
    end = tl.minimum(start + iters_per_split, N * num_p)
    acc_bias = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc_shift = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for it in range(start, end):
        n = it // num_p
        p = (it % num_p) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        oh = p // OW
        ow = p % OW
        if CHANNELS_LAST:
            pix = oh * stride_yh + ow * stride_yw
        else:
            pix = oh * stride_yh + ow
        off = n.to(tl.int64) * stride_yn + chan + pix[:, None]
        mask = p_mask[:, None] & c_mask[None, :]
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gz = dy
        if HAS_SCALE:
            gz = gz * scale
        if ACTIVATION != 0 or (HAS_SCALE and REDUCE):
            z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION != 0:
            gz = gz * _activation_grad(z, ACTIVATION)
        if STORE_GZ:
            tl.store(gz_ptr + off, gz, mask=mask)
        if REDUCE:
            acc_bias += gz
            acc_shift += dy
            if HAS_SCALE:
                acc_scale += dy * _activation(z, ACTIVATION)
    if REDUCE:
        row = num_splits * C
        out = partial_ptr + split * C + c
        tl.store(out, tl.sum(acc_bias, axis=0), mask=c_mask)
        tl.store(out + row, tl.sum(acc_scale, axis=0), mask=c_mask)
        tl.store(out + 2 * row, tl.sum(acc_shift, axis=0), mask=c_mask)


@triton.jit
def _source_index(q_i, r_i, tap_offset, size, STEP, STRIDED: tl.constexpr):
    """The output index o with o * STEP = i + pad - tap_offset and whether it exists within [0, size), given
    i + pad = q_i * STEP + r_i (0 <= r_i < STEP): o exists when tap_offset has the same remainder r_i, and is then
    q_i - tap_offset // STEP. Only the (BLOCK_T,) tap offsets are divided, not the whole tile."""
    if STRIDED:
        q_t = tap_offset // STEP
        o = q_i - q_t
        ok = (tap_offset - q_t * STEP == r_i) & (o >= 0)
    else:
        o = q_i - tap_offset
        ok = o >= 0
    return o, ok & (o < size)


@triton.jit
def _dwconv_bwd_input_kernel(
    gz_ptr,
    w_ptr,
    dx_ptr,
    C,
    H,
    W,
    OH,
    OW,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
    stride_wc,
    stride_wt,
    KH,
    KW,
    STRIDE_H,
    STRIDE_W,
    PAD_T,
    PAD_L,
    DIL_H,
    DIL_W,
    STRIDED: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx[n, c, ih, iw] = sum over taps (kh, kw) with ih + PAD_T - kh * DIL_H = oh * STRIDE_H and
    iw + PAD_L - kw * DIL_W = ow * STRIDE_W of gz[n, c, oh, ow] * w[c, kh, kw]: the transposed convolution.

    Grid: (N * cdiv(C, BLOCK_C) * cdiv(H * W, BLOCK_P),). gz_ptr: (N, C, OH, OW) with strides stride_y*; w_ptr:
    (C, KH * KW) read through (stride_wc, stride_wt); dx_ptr: (N, C, H, W) with strides stride_x*. STRIDED is
    False when both strides are 1 (no divisibility test then).
    """
    n, ih, iw, p_mask, c, c_mask = _pixel_tile(tl.program_id(0), H, W, C, BLOCK_P, BLOCK_C)
    stride_xc, stride_xw = _layout_strides(stride_xc, stride_xw, CHANNELS_LAST)
    stride_yc, stride_yw = _layout_strides(stride_yc, stride_yw, CHANNELS_LAST)
    g_base = gz_ptr + n.to(tl.int64) * stride_yn + (c * stride_yc)[None, None, :]
    w_base = w_ptr + (c * stride_wc)[None, None, :]
    pc_mask = p_mask[None, :, None] & c_mask[None, None, :]
    # ih + PAD_T = q_h * STRIDE_H + r_h, once per pixel (the same for w).
    q_h = (ih + PAD_T) // STRIDE_H
    r_h = ih + PAD_T - q_h * STRIDE_H
    q_w = (iw + PAD_L) // STRIDE_W
    r_w = iw + PAD_L - q_w * STRIDE_W
    q_h, r_h, q_w, r_w = q_h[None, :, None], r_h[None, :, None], q_w[None, :, None], r_w[None, :, None]
    acc = tl.zeros((BLOCK_T, BLOCK_P, BLOCK_C), dtype=tl.float32)
    for t0 in range(0, KH * KW, BLOCK_T):
        t, kh, kw, t_mask = _taps(t0, KH, KW, BLOCK_T)
        oh, ok_h = _source_index(q_h, r_h, kh * DIL_H, OH, STRIDE_H, STRIDED)
        ow, ok_w = _source_index(q_w, r_w, kw * DIL_W, OW, STRIDE_W, STRIDED)
        gv = tl.load(g_base + oh * stride_yh + ow * stride_yw, mask=pc_mask & t_mask & ok_h & ok_w, other=0.0)
        acc += gv.to(tl.float32) * _tap_weights(w_base, t, t_mask, c_mask, stride_wt)
    dx_off = _image_offsets(n, c, ih, iw, stride_xn, stride_xc, stride_xh, stride_xw)
    tl.store(dx_ptr + dx_off, tl.sum(acc, axis=0).to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _dwconv_bwd_weight_kernel(
    x_ptr,
    gz_ptr,
    partial_ptr,
    N,
    C,
    H,
    W,
    OH,
    OW,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
    KH,
    KW,
    STRIDE_H,
    STRIDE_W,
    PAD_T,
    PAD_L,
    DIL_H,
    DIL_W,
    iters_per_split,
    num_splits,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-split partial weight gradients: partial[s, c, t] = sum over the split's (image, output pixel) of
    gz[n, c, oh, ow] * x[n, c, oh * STRIDE_H - PAD_T + kh * DIL_H, ow * STRIDE_W - PAD_L + kw * DIL_W],
    t = kh * KW + kw.

    Grid: (cdiv(KH * KW, BLOCK_T) * cdiv(C, BLOCK_C) * num_splits,). x_ptr: (N, C, H, W) with strides stride_x*;
    gz_ptr: (N, C, OH, OW) with strides stride_y*; partial_ptr: (num_splits, C, KH * KW) fp32. Split s covers the
    (image, pixel block) iterations [s * iters_per_split, (s + 1) * iters_per_split). Each iteration loads a gz
    block once and gathers the x values of the program's BLOCK_T taps into a (BLOCK_T, BLOCK_P, BLOCK_C) tile.
    """
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    num_t = tl.cdiv(KH * KW, BLOCK_T)
    t, kh, kw, t_mask = _taps((rest % num_t) * BLOCK_T, KH, KW, BLOCK_T)
    c = (rest // num_t) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    tap_h = kh * DIL_H - PAD_T
    tap_w = kw * DIL_W - PAD_L
    if CHANNELS_LAST:
        x_chan = c[None, None, :]
        g_chan = c[None, None, :]
    else:
        x_chan = c[None, None, :] * stride_xc
        g_chan = c[None, None, :] * stride_yc
    tc_mask = t_mask & c_mask[None, None, :]
    num_p = tl.cdiv(OH * OW, BLOCK_P)
    start = split * iters_per_split
    end = tl.minimum(start + iters_per_split, N * num_p)
    acc = tl.zeros((BLOCK_T, BLOCK_P, BLOCK_C), dtype=tl.float32)
    for it in range(start, end):
        n = (it // num_p).to(tl.int64)
        p = (it % num_p) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < OH * OW
        oh = p // OW
        ow = p - oh * OW
        if CHANNELS_LAST:
            g_pix = oh * stride_yh + ow * stride_yw
        else:
            g_pix = oh * stride_yh + ow
        gv = tl.load(
            gz_ptr + n * stride_yn + g_chan + g_pix[None, :, None],
            mask=p_mask[None, :, None] & c_mask[None, None, :],
            other=0.0,
        )
        ih = (oh * STRIDE_H)[None, :, None] + tap_h
        iw = (ow * STRIDE_W)[None, :, None] + tap_w
        ok = tc_mask & p_mask[None, :, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if CHANNELS_LAST:
            x_pix = ih * stride_xh + iw * stride_xw
        else:
            x_pix = ih * stride_xh + iw
        xv = tl.load(x_ptr + n * stride_xn + x_chan + x_pix, mask=ok, other=0.0)
        acc += gv.to(tl.float32) * xv.to(tl.float32)
    out = partial_ptr + split * C * KH * KW + c[None, None, :] * (KH * KW) + t
    tl.store(out, tl.sum(acc, axis=1)[:, None, :], mask=tc_mask)


# --- launchers ------------------------------------------------------------------------------------------------


def _pick_tile(tiles: tuple[tuple[int, ...], ...], size: int, axis: int) -> tuple[int, ...]:
    """The first tile whose entry ``axis`` covers ``size``, else the last (largest)."""
    for tile in tiles:
        if tile[axis] >= size:
            return tile
    return tiles[-1]


def conv_tile(pixels: int, channels: int, channels_last: bool) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_P, BLOCK_C, num_warps) of the general forward (NCHW), dx and dweight kernels for images of
    ``pixels`` pixels (the kernel's own pixel axis: output pixels for forward and dweight, input pixels for dx)."""
    if channels_last:
        return _pick_tile(CHANNELS_LAST_TILES, channels, 2)
    return _pick_tile(NCHW_TILES, pixels, 1)


def uses_row_kernel(
    x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int]
) -> bool:
    """Whether the forward's row kernel runs this call; the general kernel runs the others: channels_last, fp32, a
    stride or dilation above 1, a kernel size outside ROW_SIZES, or a padding other than "same" ((k - 1) / 2 on
    every side, a compile-time constant of the row kernel)."""
    kh, kw = weight.shape[2], weight.shape[3]
    return (
        not _is_channels_last(x)
        and x.dtype in ROW_DTYPES
        and tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and kh == kw
        and kh in ROW_SIZES
        and list(padding) == [(kh - 1) // 2] * 4
    )


def row_window(width: int, size: int) -> tuple[int, int]:
    """The row kernel's (ALIGN, VEC) for images ``width`` wide and a size x size kernel ("same" padding): windows
    ROW_ALIGN columns wide on each side and rows read in vectors of ROW_ALIGN elements where the width is a multiple
    of ROW_ALIGN, else the narrowest window and single elements."""
    return (ROW_ALIGN, ROW_ALIGN) if width % ROW_ALIGN == 0 else ((size - 1) // 2, 1)


def row_images_per_program(images: int, tiles: int) -> int:
    """Images each program of the row kernel runs (its weight matrix built once for them): ROW_IMAGES, fewer where
    the grid would have under ROW_MIN_PROGRAMS programs, at least 1."""
    return max(1, min(ROW_IMAGES, images, images * tiles // ROW_MIN_PROGRAMS))


def split_count(iterations: int, programs: int) -> int:
    """How many parts a reduction over ``iterations`` (image, pixel block) steps is split into, given ``programs``
    programs per split: up to about TARGET_PROGRAMS programs, with at least MIN_SPLIT_ITERATIONS iterations each.
    Depends on the shape only, so results are reproducible across runs and devices."""
    return max(1, min(iterations // MIN_SPLIT_ITERATIONS, TARGET_PROGRAMS // max(programs, 1)))


def _tile_constexprs(channels_last: bool, block_t: int, block_p: int, block_c: int) -> dict[str, int]:
    """The layout switch and tile of the forward, dx and dweight kernels (a :func:`conv_tile` less its warps)."""
    return {"CHANNELS_LAST": channels_last, "BLOCK_T": block_t, "BLOCK_P": block_p, "BLOCK_C": block_c}


def _is_channels_last(x: torch.Tensor) -> bool:
    return memory_format(x) == torch.channels_last


def _conv_args(weight: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int]) -> tuple[int, ...]:
    """The kernels' (KH, KW, STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W)."""
    return weight.shape[2], weight.shape[3], stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1]


def _weight_view(weight: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, int, int]:
    """weight (C, 1, kh, kw) as a (C, kh * kw) matrix and its (channel, tap) strides; for channels_last a
    tap-major copy, so the BLOCK_C channels of one tap are contiguous."""
    channels = weight.shape[0]
    taps = weight.shape[2] * weight.shape[3]
    if channels_last:
        return weight.reshape(channels, taps).t().contiguous(), 1, channels
    return weight, taps, 1


_EPILOGUE_FLAGS = ("HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "HAS_RESIDUAL", "ACTIVATION", "SAVE_Z")


def _fwd_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    epilogue_tensors: tuple[torch.Tensor, ...],
    y: torch.Tensor,
    z: torch.Tensor,
    epilogue: dict[str, int],
) -> None:
    """Launch the row kernel: y (and z) = the "same" convolution of NCHW x with weight (C, 1, k, k), and the
    epilogue of the flags in ``epilogue`` with (bias, scale, shift, residual) = ``epilogue_tensors``."""
    n, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    size = weight.shape[2]
    block_r, block_w, warps = ROW_TILE
    tiles = channels * triton.cdiv(out_h, block_r) * triton.cdiv(out_w, block_w)
    images = row_images_per_program(n, tiles)
    align, vec = row_window(width, size)
    _dwconv_fwd_rows_kernel[(tiles, triton.cdiv(n, images))](
        x,
        weight,
        *epilogue_tensors,
        y,
        z,
        n,
        channels,
        height,
        width,
        out_h,
        out_w,
        *x.stride()[:3],
        *y.stride()[:3],
        weight.stride(0),
        images,
        **epilogue,
        PAD_T=(size - 1) // 2,
        PAD_L=(size - 1) // 2,
        KH=size,
        KW=size,
        BLOCK_R=block_r,
        BLOCK_W=block_w,
        ALIGN=align,
        VEC=vec,
        num_warps=warps,
    )


def _fwd_cl(x, weight, epilogue_tensors, y, z, epilogue, stride, pads, dilation) -> None:
    """Launch the channels_last forward: y (and z) = the convolution of x with weight (C, 1, KH, KW) at ``stride``,
    top / left ``pads`` and ``dilation``, the output's size that of y, and the epilogue of the flags in
    ``epilogue`` with (bias, scale, shift, residual) = ``epilogue_tensors``."""
    n, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    # the kernel's tap-major fp32 copy (KH * KW, C), made in one step
    w = weight.reshape(channels, -1).t().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    block_p, block_c, warps = CL_FWD_TILES[channels % CL_FWD_ALIGN == 0]
    grid = (n * triton.cdiv(channels, block_c) * triton.cdiv(out_h * out_w, block_p),)
    _dwconv_fwd_cl_kernel[grid](
        x,
        w,
        *epilogue_tensors,
        y,
        z,
        channels,
        height,
        width,
        out_h,
        out_w,
        x.stride(0),
        *x.stride()[2:],
        y.stride(0),
        *y.stride()[2:],
        *weight.shape[2:],
        *stride,
        *pads,
        *dilation,
        **epilogue,
        EVEN_C=channels % block_c == 0,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=warps,
        maxnreg=CL_FWD_MAX_REGISTERS,
    )


def depthwise_conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: int,
    save_z: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the kernel contract: y (N, C, OH, OW) and z (same shape, or empty unless ``save_z``).

    x, residual: (N, C, H, W) / (N, C, OH, OW) contiguous in x's memory format; weight (C, 1, kh, kw); bias, scale,
    shift (C,); padding [top, bottom, left, right]; activation 0 none, 1 gelu, 2 relu.
    """
    n, channels, height, width = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    out_h = output_size(height, kh, stride[0], padding[0], padding[1], dilation[0])
    out_w = output_size(width, kw, stride[1], padding[2], padding[3], dilation[1])
    fmt = memory_format(x)
    y = torch.empty((n, channels, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=fmt)
    z = torch.empty_like(y) if save_z else x.new_empty(0)
    if y.numel() == 0:
        return y, z
    epilogue = {
        "HAS_BIAS": bias is not None,
        "HAS_SCALE": scale is not None,
        "HAS_SHIFT": shift is not None,
        "HAS_RESIDUAL": residual is not None,
        "ACTIVATION": activation,
        "SAVE_Z": save_z,
    }
    epilogue_tensors = (
        x if bias is None else bias,
        x if scale is None else scale,
        x if shift is None else shift,
        y if residual is None else residual,
    )
    z_out = z if save_z else y
    if uses_row_kernel(x, weight, stride, padding, dilation):
        _fwd_rows(x, weight, epilogue_tensors, y, z_out, epilogue)
        return y, z
    if _is_channels_last(x):
        _fwd_cl(x, weight, epilogue_tensors, y, z_out, epilogue, stride, (padding[0], padding[2]), dilation)
        return y, z
    w, stride_wc, stride_wt = _weight_view(weight, False)
    block_t, block_p, block_c, warps = conv_tile(out_h * out_w, channels, False)
    grid = (n * triton.cdiv(channels, block_c) * triton.cdiv(out_h * out_w, block_p),)
    _dwconv_fwd_kernel[grid](
        x,
        w,
        *epilogue_tensors,
        y,
        z_out,
        channels,
        height,
        width,
        out_h,
        out_w,
        *x.stride(),
        *y.stride(),
        stride_wc,
        stride_wt,
        *_conv_args(weight, stride, padding, dilation),
        **epilogue,
        BLOCK_T=block_t,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return y, z


def depthwise_conv2d_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the kernel contract: (dx, dweight, dbias, dscale, dshift), those not in ``output_mask`` empty.

    dy, z: (N, C, OH, OW) contiguous in x's memory format (z may be empty when neither an activation nor scale
    needs it); x (N, C, H, W); weight (C, 1, kh, kw); scale (C,) or None. All reductions are deterministic.
    """
    need_dx, need_dw, need_dbias, need_dscale, need_dshift = output_mask
    n, channels, height, width = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    out_h, out_w = dy.shape[2], dy.shape[3]
    fmt = memory_format(x)
    channels_last = _is_channels_last(x)
    dx = torch.empty_like(x, memory_format=fmt) if need_dx else x.new_empty(0)
    dweight = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    vectors = [weight.new_empty(channels) if needed else weight.new_empty(0) for needed in output_mask[2:]]
    if x.numel() == 0 or dy.numel() == 0:
        for grad in (dx, dweight, *vectors):
            grad.zero_()
        return dx, dweight, *vectors

    gz = dy
    needs_gz = need_dx or need_dw
    through_epilogue = activation != 0 or scale is not None
    reduce = need_dbias or need_dscale or need_dshift
    if reduce or (needs_gz and through_epilogue):
        store_gz = needs_gz and through_epilogue
        if store_gz:
            # in the storage dtype, as dy: a 2-byte gz (rounded once from its fp32 value) keeps dx and dweight
            # within the error bound of the same-dtype reference, and lets dx run on the row kernel
            gz = torch.empty_like(dy, memory_format=fmt)
        block_p, block_c, warps = EPILOGUE_BWD_TILE[channels_last]
        pixel_blocks = triton.cdiv(out_h * out_w, block_p)
        channel_blocks = triton.cdiv(channels, block_c)
        splits = split_count(n * pixel_blocks, channel_blocks)
        partials = torch.empty((3, splits, channels), dtype=torch.float32, device=dy.device)
        _dwconv_bwd_epilogue_kernel[(channel_blocks * splits,)](
            dy,
            dy if z.numel() == 0 else z,
            dy if scale is None else scale,
            gz,
            partials,
            n,
            channels,
            out_h * out_w,
            out_w,
            *dy.stride(),
            triton.cdiv(n * pixel_blocks, splits),
            splits,
            HAS_SCALE=scale is not None,
            ACTIVATION=activation,
            STORE_GZ=store_gz,
            REDUCE=reduce,
            CHANNELS_LAST=channels_last,
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=warps,
        )
        if reduce:
            sums = partials.sum(dim=1)
            for i, (needed, grad) in enumerate(zip(output_mask[2:], vectors)):
                if needed:
                    grad.copy_(sums[i])

    conv_args = _conv_args(weight, stride, padding, dilation)
    if need_dx and uses_row_kernel(x, weight, stride, padding, dilation):
        # At stride 1 with "same" padding of an odd kernel, dx is the "same" convolution of gz with the weights
        # flipped: the forward's row kernel, without an epilogue.
        bare = {**dict.fromkeys(_EPILOGUE_FLAGS, False), "ACTIVATION": 0}
        _fwd_rows(gz, torch.flip(weight, (2, 3)), (gz,) * 4, dx, dx, bare)
    elif need_dx and channels_last and tuple(stride) == (1, 1):
        # At stride 1, dx is the convolution of gz with the weights flipped, padded by the kernel's extent less
        # the forward's padding: the channels_last forward kernel, without an epilogue.
        bare = {**dict.fromkeys(_EPILOGUE_FLAGS, False), "ACTIVATION": 0}
        pads = [(size - 1) * dil - pad for size, dil, pad in zip(weight.shape[2:], dilation, (padding[0], padding[2]))]
        _fwd_cl(gz, torch.flip(weight, (2, 3)), (gz,) * 4, dx, dx, bare, (1, 1), pads, dilation)
    elif need_dx:
        w, stride_wc, stride_wt = _weight_view(weight, channels_last)
        block_t, block_p, block_c, warps = conv_tile(height * width, channels, channels_last)
        grid = (n * triton.cdiv(channels, block_c) * triton.cdiv(height * width, block_p),)
        _dwconv_bwd_input_kernel[grid](
            gz,
            w,
            dx,
            channels,
            height,
            width,
            out_h,
            out_w,
            *dx.stride(),
            *gz.stride(),
            stride_wc,
            stride_wt,
            *conv_args,
            STRIDED=tuple(stride) != (1, 1),
            **_tile_constexprs(channels_last, block_t, block_p, block_c),
            num_warps=warps,
        )
    if need_dw:
        block_t, block_p, block_c, warps = conv_tile(out_h * out_w, channels, channels_last)
        programs = triton.cdiv(kh * kw, block_t) * triton.cdiv(channels, block_c)
        iterations = n * triton.cdiv(out_h * out_w, block_p)
        splits = split_count(iterations, programs)
        partials = torch.empty((splits, channels, kh * kw), dtype=torch.float32, device=x.device)
        _dwconv_bwd_weight_kernel[(programs * splits,)](
            x,
            gz,
            partials,
            n,
            channels,
            height,
            width,
            out_h,
            out_w,
            *x.stride(),
            *gz.stride(),
            *conv_args,
            triton.cdiv(iterations, splits),
            splits,
            **_tile_constexprs(channels_last, block_t, block_p, block_c),
            num_warps=warps,
        )
        dweight.copy_(partials.sum(dim=0).view(weight.shape))
    return dx, dweight, *vectors


# --- kernel report --------------------------------------------------------------------------------------------

_CONV_SHAPE_ARGS = ("C", "H", "W", "OH", "OW")
_X_STRIDES = ("stride_xn", "stride_xc", "stride_xh", "stride_xw")
_Y_STRIDES = ("stride_yn", "stride_yc", "stride_yh", "stride_yw")
_CONV_ARGS = ("KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_T", "PAD_L", "DIL_H", "DIL_W")
_SPLIT_ARGS = ("iters_per_split", "num_splits")


def _i32(names: tuple[str, ...]) -> dict[str, str]:
    return dict.fromkeys(names, "i32")


def _activation_codes() -> list[int]:
    return sorted(ACTIVATION_CODES.values())


def _conv_tiles() -> list[tuple[bool, tuple[int, int, int, int]]]:
    """(channels_last, tile) for every tile :func:`conv_tile` can pick."""
    return [(False, tile) for tile in NCHW_TILES] + [(True, tile) for tile in CHANNELS_LAST_TILES]


def _fwd_specs(dtype: str) -> list[KernelSpec]:
    ptr = f"*{dtype}"
    signature = {
        **dict.fromkeys(("x_ptr", "w_ptr", "bias_ptr", "scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "z_ptr"), ptr),
        **_i32(_CONV_SHAPE_ARGS + _X_STRIDES + _Y_STRIDES + ("stride_wc", "stride_wt") + _CONV_ARGS),
    }
    # Every activation with every epilogue tensor (the worst case), and the bare convolution.
    flag_sets = [(activation, True) for activation in _activation_codes()] + [(0, False)]
    specs = []
    for (block_t, block_p, block_c, warps), (activation, epilogue) in itertools.product(NCHW_TILES, flag_sets):
        constexprs = {
            **dict.fromkeys(("HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "HAS_RESIDUAL"), epilogue),
            "ACTIVATION": activation,
            "SAVE_Z": epilogue,
            "BLOCK_T": block_t,
            "BLOCK_P": block_p,
            "BLOCK_C": block_c,
        }
        specs.append(KernelSpec("dwconv_fwd", _dwconv_fwd_kernel, signature, constexprs, warps))
    return specs


def _fwd_cl_specs(dtype: str) -> list[KernelSpec]:
    ptr = f"*{dtype}"
    signature = {
        **dict.fromkeys(("x_ptr", "bias_ptr", "scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "z_ptr"), ptr),
        "w_ptr": "*fp32",
        **_i32(_CONV_SHAPE_ARGS + ("stride_xn", "stride_xh", "stride_xw", "stride_yn", "stride_yh", "stride_yw")),
        **_i32(_CONV_ARGS),
    }
    flag_sets = [(activation, True) for activation in _activation_codes()] + [(0, False)]
    specs = []
    for aligned, even, (activation, epilogue) in itertools.product((False, True), (False, True), flag_sets):
        block_p, block_c, warps = CL_FWD_TILES[aligned]
        if even and not aligned:
            continue  # fewer channels than a multiple of CL_FWD_ALIGN are not a multiple of the tile's
        constexprs = {
            **dict.fromkeys(("HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "HAS_RESIDUAL"), epilogue),
            "ACTIVATION": activation,
            "SAVE_Z": epilogue,
            "EVEN_C": even,
            "BLOCK_P": block_p,
            "BLOCK_C": block_c,
        }
        spec = KernelSpec(
            "dwconv_fwd_cl", _dwconv_fwd_cl_kernel, signature, constexprs, warps, maxnreg=CL_FWD_MAX_REGISTERS
        )
        specs.append(dataclasses.replace(spec, aligned=CL_FWD_ALIGNED if aligned else ()))
    return specs


def _fwd_rows_specs(dtype: str) -> list[KernelSpec]:
    if dtype not in {TRITON_DTYPES[t] for t in ROW_DTYPES}:
        return []
    ptr = f"*{dtype}"
    signature = {
        **dict.fromkeys(("x_ptr", "w_ptr", "bias_ptr", "scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "z_ptr"), ptr),
        **_i32(("N",) + _CONV_SHAPE_ARGS + _X_STRIDES[:3] + _Y_STRIDES[:3] + ("stride_wc", "images_per_program")),
    }
    block_r, block_w, warps = ROW_TILE
    specs = []
    for size in ROW_SIZES:
        for align, vec in (row_window(ROW_ALIGN, size), row_window(1, size)):
            # The whole epilogue with GELU (the worst case) and the bare convolution (dx too).
            for epilogue in (True, False):
                constexprs = {
                    **dict.fromkeys(("HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "HAS_RESIDUAL", "SAVE_Z"), epilogue),
                    "ACTIVATION": 1 if epilogue else 0,
                    "PAD_T": (size - 1) // 2,
                    "PAD_L": (size - 1) // 2,
                    "KH": size,
                    "KW": size,
                    "BLOCK_R": block_r,
                    "BLOCK_W": block_w,
                    "ALIGN": align,
                    "VEC": vec,
                }
                specs.append(KernelSpec("dwconv_fwd_rows", _dwconv_fwd_rows_kernel, signature, constexprs, warps))
    return specs


def _epilogue_bwd_specs(dtype: str) -> list[KernelSpec]:
    signature = {
        "dy_ptr": f"*{dtype}",
        "z_ptr": f"*{dtype}",
        "scale_ptr": f"*{dtype}",
        "gz_ptr": f"*{dtype}",
        "partial_ptr": "*fp32",
        **_i32(("N", "C", "P", "OW") + _Y_STRIDES + _SPLIT_ARGS),
    }
    specs = []
    for channels_last, (block_p, block_c, warps) in EPILOGUE_BWD_TILE.items():
        for activation in _activation_codes():
            constexprs = {
                "HAS_SCALE": True,
                "ACTIVATION": activation,
                "STORE_GZ": True,
                "REDUCE": True,
                "CHANNELS_LAST": channels_last,
                "BLOCK_P": block_p,
                "BLOCK_C": block_c,
            }
            specs.append(KernelSpec("dwconv_bwd_epilogue", _dwconv_bwd_epilogue_kernel, signature, constexprs, warps))
    return specs


def _input_bwd_specs(dtype: str) -> list[KernelSpec]:
    # gz (dy itself, or the epilogue backward's buffer) has x's dtype
    signature = {
        "gz_ptr": f"*{dtype}",
        "w_ptr": f"*{dtype}",
        "dx_ptr": f"*{dtype}",
        **_i32(_CONV_SHAPE_ARGS + _X_STRIDES + _Y_STRIDES + ("stride_wc", "stride_wt") + _CONV_ARGS),
    }
    specs = []
    for channels_last, (block_t, block_p, block_c, warps) in _conv_tiles():
        for strided in (False, True):
            constexprs = {"STRIDED": strided, **_tile_constexprs(channels_last, block_t, block_p, block_c)}
            specs.append(KernelSpec("dwconv_bwd_input", _dwconv_bwd_input_kernel, signature, constexprs, warps))
    return specs


def _weight_bwd_specs(dtype: str) -> list[KernelSpec]:
    signature = {
        "x_ptr": f"*{dtype}",
        "gz_ptr": f"*{dtype}",
        "partial_ptr": "*fp32",
        **_i32(("N",) + _CONV_SHAPE_ARGS + _X_STRIDES + _Y_STRIDES + _CONV_ARGS + _SPLIT_ARGS),
    }
    specs = []
    for channels_last, (block_t, block_p, block_c, warps) in _conv_tiles():
        constexprs = _tile_constexprs(channels_last, block_t, block_p, block_c)
        specs.append(KernelSpec("dwconv_bwd_weight", _dwconv_bwd_weight_kernel, signature, constexprs, warps))
    return specs


def report_specs() -> list[KernelSpec]:
    """Every kernel of this module in every config its launchers can pick, for fp32, fp16 and bf16."""
    specs = []
    for torch_dtype in REPORT_DTYPES:
        dtype = TRITON_DTYPES[torch_dtype]
        for make in (
            _fwd_specs,
            _fwd_cl_specs,
            _fwd_rows_specs,
            _epilogue_bwd_specs,
            _input_bwd_specs,
            _weight_bwd_specs,
        ):
            specs += [dataclasses.replace(spec, meta={"dtype": dtype}) for spec in make(dtype)]
    return specs
