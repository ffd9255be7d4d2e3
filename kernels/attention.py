"""Triton kernels for attention with learned position biases: ``softmax(scale * q @ k^T + bias) @ v``.

One forward kernel and one backward family, the bias a compile-time switch (``BIAS_MODE``):

* 0: no bias;
* 1: relative-position table ((2Wh-1)(2Ww-1), H), geometry [Wh, Ww]: bias[h, i, j] = table[(yi-yj+Wh-1)*(2Ww-1) +
  (xi-xj+Ww-1), h], the index computed from token coordinates inside the kernel;
* 2: LeViT biases (H, R*R), geometry [R, s]: keys on the R x R grid, queries on the stride-s grid:
  bias[h, i, j] = biases[h, |s*yi - yj|*R + |s*xi - xj|];
* 3: a dense 4-D bias broadcastable to (B, H, Nq, Nk), broadcast dims read with stride 0, -inf allowed.

With any mode, ``HAS_MASK`` adds a (num_windows, Nq, Nk) additive mask (no gradient) to the scores of batch entry b
as mask[b % num_windows]: Swin's shifted-window mask (timm ``swin_transformer.WindowAttention``), read inside the
kernels, never expanded to (B, H, Nq, Nk).

Kernels (all accumulate in fp32; the softmax is streamed in base 2 with the log2(e) factor folded into the scores;
fp16 / bf16 dots run on tensor cores, fp32 dots exact (``input_precision="ieee"``) on 16 x 16 tiles):

* :func:`_attention_fwd_kernel`: per query block, streams over key blocks; writes out and lse.
* :func:`_attention_fwd_short_kernel`: the same for fp16 / bf16 up to 256 keys and head blocks of 64, a query
  block of one head over a chunk of batch entries, the window geometry compile-time; where one key block covers
  the keys, a one-pass softmax and a table / biases tile gathered once per program.
* :func:`_attention_bwd_dq_kernel`: per query block: delta = rowsum(dout * out), dq, and for a dense bias dS,
  written straight into the bias gradient when the bias has the full (B, H, Nq, Nk) shape, else into an fp32 buffer
  of that shape that the launcher sums over the broadcast dims (mode 3 only).
* :func:`_attention_bwd_dkdv_kernel`: per key block, streams over query blocks: dk, dv.
* :func:`_attention_bwd_table_kernel`: the table / biases gradient (modes 1 and 2), deterministic and atomic-free.
  A program owns one head, one row offset (dy = yi - yj for tables, |s*yi - yj| for LeViT), one block of column
  offsets and one chunk of the batch. For each pair of query-row / key-row x-blocks it recomputes dS tile by tile
  for every query row yi paired with that offset and every batch element of its chunk, sums the tiles in a fixed
  order, then folds the summed (BLOCK_X, BLOCK_X) tile into column-offset bins with a gather along each query
  row. Partials (chunks, H, row offsets, column offsets) are summed over chunks by the launcher (a fixed-order
  reduction). Nothing of size (B, H, Nq, Nk) exists at any point for modes 0-2.
* :func:`_attention_bwd_short_kernel`: fp16 / bf16 up to 256 queries and keys and head blocks of 64, per head,
  query block and chunk of the batch: P and dS once per key block, dq, and dS summed over the chunk into a
  (chunks, H, Nq, Nk) fp32 buffer (table / biases) or stored per entry (dense bias); where one query block holds
  every query (up to 64, head blocks up to 32) also dk and dv, else (``SPLIT_Q``) delta for the dk/dv kernel.
  :func:`_attention_bins_kernel` folds the buffer, summed over chunks, into the table by a fixed-order gather.
  This replaces the dq and table kernels (and where it holds every query the dk/dv kernel) for those shapes.

Launchers choose block sizes per shape in one small function per kernel (``_*_config``); ``report_specs`` lists
every config they can pick.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch
import triton
import triton.language as tl

from vitkern.kernels._compat import NARROW_TILES
from vitkern.kernels._specs import REPORT_DTYPES, TRITON_DTYPES, KernelSpec
from vitkern.kernels.contract import BIAS_DENSE, BIAS_LEVIT, BIAS_MODES, BIAS_REL_POS, MAX_HEAD_DIM

LOG2E = tl.constexpr(1.4426950408889634)
_LOG2E_FP32 = torch.tensor(1.4426950408889634, dtype=torch.float32)  # LOG2E as the kernels' fp32 products round it
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
SHORT_TOKENS = 16  # up to this many tokens a 16 x 16 tile holds the whole sequence
LONG_TILE = 64
MAX_HEAD_BLOCK = MAX_HEAD_DIM
HEAD_COLUMNS_PER_WARP = 32
# fp32's exact dots hold about twice the registers per head column: at one warp per 32 columns triton 3.6's build
# of the forward spills (d32, d64), so fp32 takes one warp per 16 columns on every triton.
FP32_HEAD_COLUMNS_PER_WARP = 16
BWD_HEAD_COLUMNS_PER_WARP = 16
WIDE_TILE_MAX_HEAD = 32  # the forward's 64 x 64 tiles up to this head block
HEAD_BLOCKS = (16, 32, 64, 128)
NUM_STAGES = 2
# Every launch lets ptxas use the whole register file: left to its own heuristics it caps some of these kernels at
# 96-168 registers and spills a few bytes.
MAX_REGISTERS = 255
# The table-gradient kernel: x-blocks of TABLE_BLOCK_X tokens, column-offset bins in blocks of TABLE_BLOCK_G (2Ww - 1
# or R bins in all), and enough batch chunks to give about TARGET_PROGRAMS programs.
TABLE_BLOCK_X = 16
TABLE_BLOCK_G = 64
TABLE_NARROW_HEAD = 32  # head blocks up to this run the table kernel on 4 warps, wider ones on 8
TARGET_PROGRAMS = 1024
# The short-sequence backward (:func:`_attention_bwd_short_kernel`): fp16 / bf16, every query in one tile (up to
# SHORT_MAX_QUERIES), up to SHORT_MAX_TOKENS keys, head blocks up to SHORT_MAX_HEAD; programs of one head and a
# chunk of the batch, about TARGET_PROGRAMS of them, and the table gradient's (chunks, H, Nq, Nk) fp32 dS buffer at
# most SHORT_DS_BYTES (fewer, longer chunks past that).
SHORT_MAX_QUERIES = 64
SHORT_MAX_TOKENS = 256
SHORT_MAX_HEAD = 32
SHORT_DS_BYTES = 32 << 20
# Past SHORT_MAX_QUERIES queries (up to SHORT_MAX_TOKENS), or for head blocks up to SPLIT_MAX_HEAD, the short
# backward splits the queries (``SPLIT_Q``): query blocks beside SPLIT_BLOCK_N-key blocks give dq and dS, the dk/dv
# kernel dk and dv (:func:`_short_config`).
SPLIT_BLOCK_N = 16
SPLIT_WARPS = 8
SPLIT_MAX_HEAD = 64
DKDV_WARPS = 4  # the dk/dv kernel's 64 x 16 tiles of fp16 / bf16 (:func:`_dkdv_config`)
# The short-sequence forward (:func:`_attention_fwd_short_kernel`): fp16 / bf16, up to SHORT_MAX_TOKENS keys, head
# blocks up to SHORT_MAX_FWD_HEAD, 64-row query blocks on SHORT_FWD_WARPS warps.
SHORT_MAX_FWD_HEAD = 64
SHORT_FWD_WARPS = 4
SHORT_FWD_STREAM_N = 32
# The streamed short forward takes no software pipelining: its prefetched gathers held about 30 more registers a
# thread (3 blocks per SM where one stage fits 4, the kernel report's figures).
SHORT_FWD_STREAM_STAGES = 1
SHORT_FWD_ALIGN = 16
SHORT_FWD_ALIGNED = (
    "stride_qb",
    "stride_qh",
    "stride_qn",
    "stride_kb",
    "stride_kh",
    "stride_kn",
    "stride_vb",
    "stride_vh",
    "stride_vn",
    "D",
    "DV",
)
BINS_BLOCK_E = 32
BINS_BLOCK_S = 64


# --- shared device helpers --------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols):
    """Load ptr[rows, cols] (rows: (R, 1), cols: (1, C) token / feature indices), zero outside the bounds."""
    mask = (rows < n_rows) & (cols < n_cols)
    return tl.load(ptr + rows * stride_row + cols * stride_col, mask=mask, other=0.0)


@triton.jit
def _bias_tile(bias, qi, kj, mask, BIAS_MODE: tl.constexpr):
    """:func:`_bias_stored` in fp32."""
    return _bias_stored(bias, qi, kj, mask, BIAS_MODE).to(tl.float32)


@triton.jit
def _bias_stored(bias, qi, kj, mask, BIAS_MODE: tl.constexpr):
    """bias[qi, kj] in the bias's own dtype for broadcastable index tensors qi (queries) and kj (keys); 0 where ~mask.

    bias is the tuple (bias_ptr, stride_biasm, stride_biasn, q_grid_w, k_grid_w, q_step, win_h) of the kernel's
    arguments, bias_ptr already advanced to the program's (batch, head) (:func:`_head_base`). Modes 1/2 address the
    table / biases as ``index * stride_biasm``; mode 3 as ``qi * stride_biasm + kj * stride_biasn``. Query token i
    sits at (i // q_grid_w, i % q_grid_w) * q_step, key token j at (j // k_grid_w, j % k_grid_w).
    """
    bias_ptr, stride_biasm, stride_biasn, q_grid_w, k_grid_w, q_step, win_h = bias
    if BIAS_MODE == 3:
        offs = qi * stride_biasm + kj * stride_biasn
    else:
        # coordinates on the index vectors, combined per score in as few operations as the mode allows
        yi = (qi // q_grid_w) * q_step
        xi = (qi % q_grid_w) * q_step
        yj = kj // k_grid_w
        xj = kj % k_grid_w
        if BIAS_MODE == 1:
            # (yi - yj + win_h - 1) * row + (xi - xj + k_grid_w - 1): a query part minus a key part
            row = 2 * k_grid_w - 1
            offs = (yi * row + xi + (win_h - 1) * row + k_grid_w - 1) * stride_biasm - (yj * row + xj) * stride_biasm
        else:
            offs = tl.abs(yi - yj) * (k_grid_w * stride_biasm) + tl.abs(xi - xj) * stride_biasm
    return tl.load(bias_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _scaled_bias(scaled_table, query_part, key_part_ptr, kj):
    """log2(e) * bias of a relative-position table (mode 1) for query parts ``query_part`` and key indices ``kj``
    (broadcastable index tensors), from the table in its scaled form (:func:`_table_args`): scaled_table, already
    advanced to the program's head, holds log2(e) * table[:, h] and then -inf; the index is query part - key part,
    and the key parts are -entries past the keys, so padding keys read -inf. One unmasked load a score, no
    division: the geometry is in the part vectors."""
    return tl.load(scaled_table + (query_part - tl.load(key_part_ptr + kj)))


@triton.jit
def _mask_tile(attn_mask_ptr, qi, kj, valid, NK):
    """attn_mask[qi, kj] in fp32 (attn_mask_ptr already advanced to the program's window, rows of NK keys); 0 where
    ~valid."""
    return tl.load(attn_mask_ptr + qi * NK + kj, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _scores(a, b, qk_scale, bias, attn_mask_ptr, qi, kj, valid, NK, BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr):
    """Scores in base 2: (a @ b) * qk_scale (qk_scale = scale * log2(e)), plus log2(e) * (bias + mask) at query
    indices qi and key indices kj, which broadcast to the tile; bias and mask read as 0 where ~valid. a @ b is
    q @ k^T, or k @ q^T in the transposed tiles of :func:`_attention_bwd_dkdv_kernel`. bias as in
    :func:`_bias_tile`, attn_mask_ptr as in :func:`_mask_tile`."""
    s = tl.dot(a, b, input_precision="ieee") * qk_scale
    if BIAS_MODE != 0:
        s += LOG2E * _bias_tile(bias, qi, kj, valid, BIAS_MODE)
    if HAS_MASK:
        s += LOG2E * _mask_tile(attn_mask_ptr, qi, kj, valid, NK)
    return s


@triton.jit
def _table_scores(a, b, qk_scale, table, attn_mask_ptr, qi, kj, valid, NK, HAS_MASK: tl.constexpr):
    """:func:`_scores` of a relative-position table (mode 1) in its scaled form: table is the tuple (scaled_table,
    query_part, key_part_ptr) of :func:`_scaled_bias`, the query parts beside query indices qi. -inf at padding
    keys, where the mask (read as 0 where ~valid) adds 0."""
    scaled_table, query_part, key_part_ptr = table
    s = tl.dot(a, b, input_precision="ieee") * qk_scale + _scaled_bias(scaled_table, query_part, key_part_ptr, kj)
    if HAS_MASK:
        s += LOG2E * _mask_tile(attn_mask_ptr, qi, kj, valid, NK)
    return s


@triton.jit
def _softmax_out(acc, m_i, l_i):
    """(out, lse) of a finished forward row block: acc / l_i, and the natural-log logsumexp from the base-2 running
    max m_i and sum l_i (both (BLOCK_M,)); a row with every score -inf (l_i = 0) gives out = 0 and lse = -inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    return out, lse


@triton.jit
def _head_base(ptr, b, h, stride_b, stride_h):
    """ptr advanced to batch b, head h (int64 scalars); tile offsets from there stay 32-bit."""
    return ptr + b * stride_b + h * stride_h


@triton.jit
def _head_bases(q_ptr, k_ptr, v_ptr, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh):
    """q_ptr, k_ptr and v_ptr advanced to batch b, head h (:func:`_head_base`)."""
    q_base = _head_base(q_ptr, b, h, stride_qb, stride_qh)
    k_base = _head_base(k_ptr, b, h, stride_kb, stride_kh)
    v_base = _head_base(v_ptr, b, h, stride_vb, stride_vh)
    return q_base, k_base, v_base


@triton.jit
def _program_bases(H, q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh):
    """The program's batch entry and head from grid axis 1 (B * H programs): (b * H + h, b, h) as int64 scalars,
    then q_ptr, k_ptr and v_ptr advanced to them."""
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    q_base, k_base, v_base = _head_bases(
        q_ptr, k_ptr, v_ptr, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
    )
    return pid_bh, b, h, q_base, k_base, v_base


@triton.jit
def _window_base(attn_mask_ptr, b, num_windows, NQ, NK):
    """attn_mask_ptr ((num_windows, NQ, NK) contiguous) advanced to batch entry b's window, b % num_windows."""
    return attn_mask_ptr + (b % num_windows) * NQ * NK


@triton.jit
def _safe_lse2(lse_ptr, rows, n_rows):
    """lse in base 2 for the query tokens ``rows``; 0 for rows whose every score is -inf (their P is 0 anyway)."""
    lse = tl.load(lse_ptr + rows, mask=rows < n_rows, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse * LOG2E)


# --- forward ----------------------------------------------------------------------------------------------------


@triton.jit
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    attn_mask_ptr,
    out_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    H,
    NQ,
    NK,
    D,
    DV,
    scale,
    q_grid_w,
    k_grid_w,
    q_step,
    win_h,
    num_windows,
    BIAS_MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """out = softmax(scale * q @ k^T + bias) @ v and lse = logsumexp(scale * q @ k^T + bias) per query row.

    Grid: (cdiv(NQ, BLOCK_M), B * H). q_ptr: (B, H, NQ, D), k_ptr: (B, H, NK, D), v_ptr: (B, H, NK, DV), any
    strides; bias_ptr: see :func:`_bias_tile`; out_ptr: (B, H, NQ, DV) contiguous; lse_ptr: (B, H, NQ) fp32
    contiguous. A row whose every score is -inf gets out = 0 and lse = -inf.
    """
    pid_bh, b, h, q_ptr, k_ptr, v_ptr = _program_bases(
        H, q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
    )
    bias_ptr = _head_base(bias_ptr, b, h, stride_biasb, stride_biash)
    bias = (bias_ptr, stride_biasm, stride_biasn, q_grid_w, k_grid_w, q_step, win_h)
    attn_mask_ptr = _window_base(attn_mask_ptr, b, num_windows, NQ, NK)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(q_ptr, rows, offs_d[None, :], stride_qn, stride_qd, NQ, D)
    qk_scale = scale * LOG2E
    # the running max and sum as (BLOCK_M, 1) columns: as vectors, triton 3.8 carries them through the loop in the
    # bias load's layout and computes the scores a second time in it (the kernel report's SASS: a warp-wide shuffle
    # reduction per row beside the MMA layout's)
    m_i = tl.full([BLOCK_M, 1], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M, 1], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        kj = start_n + cols
        keys = start_n + tl.arange(0, BLOCK_N)[:, None]
        k = _load_tile(k_ptr, keys, offs_d[None, :], stride_kn, stride_kd, NK, D)
        s = _scores(
            q, tl.trans(k), qk_scale, bias, attn_mask_ptr, rows, kj, (rows < NQ) & (kj < NK), NK, BIAS_MODE, HAS_MASK
        )
        s = tl.where(kj < NK, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1, keep_dims=True))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1, keep_dims=True)
        v = _load_tile(v_ptr, keys, offs_dv[None, :], stride_vn, stride_vd, NK, DV)
        acc = acc * alpha + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out, lse = _softmax_out(acc, tl.reshape(m_i, [BLOCK_M]), tl.reshape(l_i, [BLOCK_M]))
    out_ptrs = out_ptr + pid_bh * NQ * DV + rows * DV + offs_dv[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < NQ) & (offs_dv[None, :] < DV))
    q_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(lse_ptr + pid_bh * NQ + q_rows, lse, mask=q_rows < NQ)


@triton.jit
def _attention_fwd_short_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    query_part_ptr,
    key_part_ptr,
    attn_mask_ptr,
    out_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    B,
    H,
    NQ,
    NK,
    D,
    DV,
    scale,
    num_windows,
    batch_per_chunk,
    BIAS_MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ONE_KEY_TILE: tl.constexpr,
    Q_GRID_W: tl.constexpr,
    K_GRID_W: tl.constexpr,
    Q_STEP: tl.constexpr,
    WIN_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """The forward of :func:`_attention_fwd_kernel` for short sequences, several batch entries per program.

    Grid: (cdiv(NQ, BLOCK_M), H, chunks); a program owns one query block of one head for the batch entries
    [chunk * batch_per_chunk, ...) of its chunk. The window geometry is compile-time (as in
    :func:`_attention_bwd_short_kernel`). Where one key block covers the keys (``ONE_KEY_TILE``) the softmax is
    one pass over the tile, and a table / biases bias (modes 1 and 2, the same for every batch entry) is gathered
    once per program, before the loop over the chunk. Past one key block a table (mode 1) is read per key block
    in its scaled form (bias_ptr, query_part_ptr and key_part_ptr as :func:`_table_args` makes them; see
    :func:`_scaled_bias`). Other pointers and outputs as in :func:`_attention_fwd_kernel`.
    """
    h = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2).to(tl.int64)
    b_lo = chunk * batch_per_chunk
    b_hi = tl.minimum(B, b_lo + batch_per_chunk)
    q_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = q_rows[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    offs_dv = tl.arange(0, BLOCK_DV)[None, :]
    qk_scale = scale * LOG2E
    one_tile = (rows < NQ) & (cols < NK)
    shared_bias = ONE_KEY_TILE and (BIAS_MODE == 1 or BIAS_MODE == 2)
    stored_bias = tl.zeros([BLOCK_M, BLOCK_N], bias_ptr.dtype.element_ty)
    if shared_bias:
        # modes 1 and 2 read one (H, entries) table for every batch entry: gather this program's tile once, kept in
        # the table's dtype (half the registers of fp32 for fp16 / bf16 tables)
        table = (bias_ptr + h * stride_biash, stride_biasm, stride_biasn, Q_GRID_W, K_GRID_W, Q_STEP, WIN_H)
        stored_bias = _bias_stored(table, rows, cols, one_tile, BIAS_MODE)
    if BIAS_MODE == 1 and not ONE_KEY_TILE:
        scaled = (bias_ptr + h * stride_biash, tl.load(query_part_ptr + rows), key_part_ptr)  # _table_scores
    for b in range(b_lo, b_hi):
        bh = b * H + h
        q_base, k_base, v_base = _head_bases(
            q_ptr, k_ptr, v_ptr, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
        )
        window_mask = _window_base(attn_mask_ptr, b, num_windows, NQ, NK)
        bias_base = _head_base(bias_ptr, b, h, stride_biasb, stride_biash)
        bias = (bias_base, stride_biasm, stride_biasn, Q_GRID_W, K_GRID_W, Q_STEP, WIN_H)
        q = _load_tile(q_base, rows, offs_d, stride_qn, 1, NQ, D)
        if ONE_KEY_TILE:
            keys = tl.arange(0, BLOCK_N)[:, None]
            k = _load_tile(k_base, keys, offs_d, stride_kn, 1, NK, D)
            v = _load_tile(v_base, keys, offs_dv, stride_vn, 1, NK, DV)
            if shared_bias:
                s = tl.dot(q, tl.trans(k)) * qk_scale + LOG2E * stored_bias.to(tl.float32)
                if HAS_MASK:
                    s += LOG2E * _mask_tile(window_mask, rows, cols, one_tile, NK)
            else:
                s = _scores(q, tl.trans(k), qk_scale, bias, window_mask, rows, cols, one_tile, NK, BIAS_MODE, HAS_MASK)
            s = tl.where(cols < NK, s, float("-inf"))
            m_i = tl.max(s, 1)
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v)
        else:
            m_i = tl.full([BLOCK_M, 1], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M, 1], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            for start_n in range(0, NK, BLOCK_N):
                kj = start_n + cols
                keys = start_n + tl.arange(0, BLOCK_N)[:, None]
                k = _load_tile(k_base, keys, offs_d, stride_kn, 1, NK, D)
                v = _load_tile(v_base, keys, offs_dv, stride_vn, 1, NK, DV)
                valid = (rows < NQ) & (kj < NK)
                if BIAS_MODE == 1:
                    s = _table_scores(q, tl.trans(k), qk_scale, scaled, window_mask, rows, kj, valid, NK, HAS_MASK)
                else:
                    s = _scores(q, tl.trans(k), qk_scale, bias, window_mask, rows, kj, valid, NK, BIAS_MODE, HAS_MASK)
                    s = tl.where(kj < NK, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1, keep_dims=True))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(s - m_safe)
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1, keep_dims=True)
                acc = acc * alpha + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            m_i = tl.reshape(m_i, [BLOCK_M])
            l_i = tl.reshape(l_i, [BLOCK_M])
        out, lse = _softmax_out(acc, m_i, l_i)
        tl.store(
            out_ptr + bh * NQ * DV + rows * DV + offs_dv,
            out.to(out_ptr.dtype.element_ty),
            mask=(rows < NQ) & (offs_dv < DV),
        )
        tl.store(lse_ptr + bh * NQ + rows, lse[:, None], mask=rows < NQ)


# --- backward ---------------------------------------------------------------------------------------------------


@triton.jit
def _attention_bwd_dq_kernel(
    dout_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    delta_ptr,
    bias_ptr,
    attn_mask_ptr,
    dq_ptr,
    dbias_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    stride_dbiasb,
    stride_dbiash,
    stride_dbiasm,
    stride_dbiasn,
    H,
    NQ,
    NK,
    D,
    DV,
    scale,
    q_grid_w,
    k_grid_w,
    q_step,
    win_h,
    num_windows,
    BIAS_MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dout * out), dq = scale * dS @ k with dS = P * (dout @ v^T - delta); with BIAS_GRAD (dense
    bias) also dS itself into dbias.

    Grid: (cdiv(NQ, BLOCK_M), B * H). dout_ptr, out_ptr: (B, H, NQ, DV) contiguous; q/k/v as in the forward;
    lse_ptr, delta_ptr: (B, H, NQ) fp32 contiguous; dq_ptr: (B, H, NQ, D) contiguous; dbias_ptr: (B, H, NQ, NK)
    through its strides.
    """
    pid_bh, b, h, q_ptr, k_ptr, v_ptr = _program_bases(
        H, q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
    )
    bias_ptr = _head_base(bias_ptr, b, h, stride_biasb, stride_biash)
    bias = (bias_ptr, stride_biasm, stride_biasn, q_grid_w, k_grid_w, q_step, win_h)
    attn_mask_ptr = _window_base(attn_mask_ptr, b, num_windows, NQ, NK)
    dbias_ptr += b * stride_dbiasb + h * stride_dbiash
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    offs_dv = tl.arange(0, BLOCK_DV)[None, :]
    q = _load_tile(q_ptr, rows, offs_d, stride_qn, stride_qd, NQ, D)
    do = _load_tile(dout_ptr + pid_bh * NQ * DV, rows, offs_dv, DV, 1, NQ, DV)
    o = _load_tile(out_ptr + pid_bh * NQ * DV, rows, offs_dv, DV, 1, NQ, DV)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    q_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(delta_ptr + pid_bh * NQ + q_rows, delta, mask=q_rows < NQ)
    lse2 = _safe_lse2(lse_ptr + pid_bh * NQ, q_rows, NQ)
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        kj = start_n + cols
        keys = start_n + tl.arange(0, BLOCK_N)[:, None]
        mask = (rows < NQ) & (kj < NK)
        k = _load_tile(k_ptr, keys, offs_d, stride_kn, stride_kd, NK, D)
        v = _load_tile(v_ptr, keys, offs_dv, stride_vn, stride_vd, NK, DV)
        s = _scores(q, tl.trans(k), qk_scale, bias, attn_mask_ptr, rows, kj, mask, NK, BIAS_MODE, HAS_MASK)
        p = tl.where(mask, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        if BIAS_GRAD:
            dbias_ptrs = dbias_ptr + rows * stride_dbiasm + kj * stride_dbiasn
            tl.store(dbias_ptrs, ds.to(dbias_ptr.dtype.element_ty), mask=mask)
    dq_ptrs = dq_ptr + pid_bh * NQ * D + rows * D + offs_d
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=(rows < NQ) & (offs_d < D))


@triton.jit
def _attention_bwd_dkdv_kernel(
    dout_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    delta_ptr,
    bias_ptr,
    query_part_ptr,
    key_part_ptr,
    attn_mask_ptr,
    dk_ptr,
    dv_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    H,
    NQ,
    NK,
    D,
    DV,
    scale,
    q_grid_w,
    k_grid_w,
    q_step,
    win_h,
    num_windows,
    BIAS_MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dv = P^T @ dout and dk = scale * dS^T @ q for one key block, streaming over query blocks (in the transposed
    orientation: tiles are (BLOCK_N keys, BLOCK_M queries)).

    Grid: (cdiv(NK, BLOCK_N), B * H). Pointers as in :func:`_attention_bwd_dq_kernel`, but a table (mode 1) in its
    scaled form (bias_ptr, query_part_ptr, key_part_ptr from :func:`_table_args`); dk_ptr: (B, H, NK, D), dv_ptr:
    (B, H, NK, DV), both contiguous.
    """
    pid_n = tl.program_id(0)
    pid_bh, b, h, q_ptr, k_ptr, v_ptr = _program_bases(
        H, q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
    )
    bias_ptr = _head_base(bias_ptr, b, h, stride_biasb, stride_biash)
    bias = (bias_ptr, stride_biasm, stride_biasn, q_grid_w, k_grid_w, q_step, win_h)
    attn_mask_ptr = _window_base(attn_mask_ptr, b, num_windows, NQ, NK)
    dout_ptr += pid_bh * NQ * DV
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(k_ptr, keys, offs_d[None, :], stride_kn, stride_kd, NK, D)
    v = _load_tile(v_ptr, keys, offs_dv[None, :], stride_vn, stride_vd, NK, DV)
    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        q_rows = start_m + tl.arange(0, BLOCK_M)
        qi = q_rows[None, :]
        mask = (qi < NQ) & (keys < NK)
        q_t = _load_tile(q_ptr, offs_d[:, None], qi, stride_qd, stride_qn, D, NQ)
        do = _load_tile(dout_ptr, q_rows[:, None], offs_dv[None, :], DV, 1, NQ, DV)
        lse2 = _safe_lse2(lse_ptr + pid_bh * NQ, q_rows, NQ)
        delta = tl.load(delta_ptr + pid_bh * NQ + q_rows, mask=q_rows < NQ, other=0.0)
        if BIAS_MODE == 1:
            # padding keys score -inf; padding queries have zero dout and delta, so their dS is 0
            scaled = (bias_ptr, tl.load(query_part_ptr + qi), key_part_ptr)
            s_t = _table_scores(k, q_t, qk_scale, scaled, attn_mask_ptr, qi, keys, mask, NK, HAS_MASK)
            p_t = tl.math.exp2(s_t - lse2[None, :])
        else:
            s_t = _scores(k, q_t, qk_scale, bias, attn_mask_ptr, qi, keys, mask, NK, BIAS_MODE, HAS_MASK)
            p_t = tl.where(mask, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision="ieee")
    tl.store(
        dk_ptr + pid_bh * NK * D + keys * D + offs_d[None, :],
        (dk * scale).to(dk_ptr.dtype.element_ty),
        mask=(keys < NK) & (offs_d[None, :] < D),
    )
    tl.store(
        dv_ptr + pid_bh * NK * DV + keys * DV + offs_dv[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=(keys < NK) & (offs_dv[None, :] < DV),
    )


@triton.jit
def _attention_bwd_table_kernel(
    dout_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    delta_ptr,
    bias_ptr,
    attn_mask_ptr,
    partial_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_biash,
    stride_biasm,
    B,
    H,
    NQ,
    NK,
    D,
    DV,
    scale,
    q_grid_w,
    k_grid_w,
    q_step,
    win_h,
    q_grid_h,
    k_grid_h,
    num_bins,
    batch_per_chunk,
    num_windows,
    BIAS_MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Partial table / biases gradient: the sum of dS over every (b, i, j) whose bias entry is one row offset and one
    block of column offsets, for one head and one chunk of the batch.

    Grid: (H, row offsets, column-offset blocks * batch chunks). Row offsets are dy + Wh - 1 (2Wh - 1 of them) for
    tables, |s*yi - yj| (R of them) for LeViT; column offsets likewise (num_bins = 2Ww - 1 or R). partial_ptr:
    (chunks, H, row offsets, num_bins) fp32 contiguous; the table entry of (row offset r, column offset g) is
    r * num_bins + g in both modes. Other pointers as in :func:`_attention_bwd_dkdv_kernel`.
    """
    h = tl.program_id(0).to(tl.int64)
    pid_dy = tl.program_id(1)
    num_g_blocks = tl.cdiv(num_bins, BLOCK_G)
    pid_chunk = tl.program_id(2) // num_g_blocks
    g0 = (tl.program_id(2) % num_g_blocks) * BLOCK_G
    b_lo = pid_chunk * batch_per_chunk
    b_hi = tl.minimum(B, b_lo + batch_per_chunk)
    if BIAS_MODE == 1:
        dy = pid_dy - (win_h - 1)
        t_lo = tl.maximum(0, dy)
        t_hi = tl.minimum(q_grid_h, q_grid_h + dy)
    else:
        # query rows yq pair with key rows s*yq + dy (the first n_plus of them) and s*yq - dy (yq >= yq_minus)
        n_plus = tl.minimum(q_grid_h, (k_grid_h - 1 - pid_dy) // q_step + 1)
        yq_minus = (pid_dy + q_step - 1) // q_step
        n_minus = tl.where(pid_dy > 0, tl.maximum(0, q_grid_h - yq_minus), 0)
        t_lo = 0
        t_hi = n_plus + n_minus
    ax = tl.arange(0, BLOCK_X)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_g = g0 + tl.arange(0, BLOCK_G)[None, :]
    bias = (bias_ptr + h * stride_biash, stride_biasm, 0, q_grid_w, k_grid_w, q_step, win_h)
    qk_scale = scale * LOG2E
    acc = tl.zeros([BLOCK_G], tl.float32)
    for xq0 in range(0, q_grid_w, BLOCK_X):
        for xk0 in range(0, k_grid_w, BLOCK_X):
            # signed column offsets x_q - x_k this block pair covers, and the bins they fall in
            lo = xq0 * q_step - (xk0 + BLOCK_X - 1)
            hi = (xq0 + BLOCK_X - 1) * q_step - xk0
            if BIAS_MODE == 1:
                bin_lo = lo + k_grid_w - 1
                bin_hi = hi + k_grid_w - 1
            else:
                bin_lo = tl.where((lo <= 0) & (hi >= 0), 0, tl.minimum(tl.abs(lo), tl.abs(hi)))
                bin_hi = tl.maximum(tl.abs(lo), tl.abs(hi))
            if (bin_lo < g0 + BLOCK_G) & (bin_hi >= g0):
                ds_sum = tl.zeros([BLOCK_X, BLOCK_X], tl.float32)
                for bb in range(b_lo, b_hi):
                    base_q, base_k, base_v = _head_bases(
                        q_ptr, k_ptr, v_ptr, bb, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
                    )
                    window_mask = _window_base(attn_mask_ptr, bb, num_windows, NQ, NK)
                    bh = bb * H + h
                    for t in range(t_lo, t_hi):
                        if BIAS_MODE == 1:
                            yq = t
                            yk = t - dy
                        else:
                            yq = tl.where(t < n_plus, t, yq_minus + t - n_plus)
                            yk = tl.where(t < n_plus, yq * q_step + pid_dy, yq * q_step - pid_dy)
                        q_rows = yq * q_grid_w + xq0 + ax
                        q_ok = xq0 + ax < q_grid_w
                        k_rows = yk * k_grid_w + xk0 + ax
                        k_ok = xk0 + ax < k_grid_w
                        qi = q_rows[:, None]
                        kj = k_rows[None, :]
                        mask = q_ok[:, None] & k_ok[None, :]
                        q = tl.load(
                            base_q + qi * stride_qn + offs_d[None, :] * stride_qd,
                            mask=q_ok[:, None] & (offs_d[None, :] < D),
                            other=0.0,
                        )
                        do = tl.load(
                            dout_ptr + bh * NQ * DV + qi * DV + offs_dv[None, :],
                            mask=q_ok[:, None] & (offs_dv[None, :] < DV),
                            other=0.0,
                        )
                        k = tl.load(
                            base_k + k_rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=k_ok[:, None] & (offs_d[None, :] < D),
                            other=0.0,
                        )
                        v = tl.load(
                            base_v + k_rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                            mask=k_ok[:, None] & (offs_dv[None, :] < DV),
                            other=0.0,
                        )
                        lse2 = _safe_lse2(lse_ptr + bh * NQ, q_rows, NQ)
                        delta = tl.load(delta_ptr + bh * NQ + q_rows, mask=q_ok, other=0.0)
                        s = _scores(q, tl.trans(k), qk_scale, bias, window_mask, qi, kj, mask, NK, BIAS_MODE, HAS_MASK)
                        p = tl.where(mask, tl.math.exp2(s - lse2[:, None]), 0.0)
                        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                        ds_sum += p * (dp - delta[:, None])
                # fold the summed tile into bins: row a of the tile holds query x = xq0 + a; the key column c that
                # lands in bin g is found per row, and gathered
                xq = (xq0 + ax[:, None]) * q_step
                if BIAS_MODE == 1:
                    c = xq - (offs_g - (k_grid_w - 1)) - xk0
                    hit = (c >= 0) & (c < BLOCK_X) & (offs_g < num_bins)
                    fold = tl.where(hit, tl.gather(ds_sum, tl.where(hit, c, 0), 1), 0.0)
                else:
                    c_lo = xq - offs_g - xk0
                    c_hi = xq + offs_g - xk0
                    hit_lo = (c_lo >= 0) & (c_lo < BLOCK_X) & (offs_g < num_bins)
                    hit_hi = (c_hi >= 0) & (c_hi < BLOCK_X) & (offs_g < num_bins) & (offs_g > 0)
                    fold = tl.where(hit_lo, tl.gather(ds_sum, tl.where(hit_lo, c_lo, 0), 1), 0.0)
                    fold += tl.where(hit_hi, tl.gather(ds_sum, tl.where(hit_hi, c_hi, 0), 1), 0.0)
                acc += tl.sum(fold, 0)
    num_dy = tl.num_programs(1)
    out_g = g0 + tl.arange(0, BLOCK_G)
    out_offs = ((pid_chunk * H + h) * num_dy + pid_dy) * num_bins + out_g
    tl.store(partial_ptr + out_offs, acc, mask=out_g < num_bins)


@triton.jit
def _attention_bwd_short_kernel(
    dout_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    delta_ptr,
    bias_ptr,
    query_part_ptr,
    key_part_ptr,
    attn_mask_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    ds_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    stride_dsb,
    stride_dsh,
    stride_dsm,
    stride_dsn,
    B,
    H,
    NQ,
    NK,
    D,
    DV,
    scale,
    num_windows,
    batch_per_chunk,
    BIAS_MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DS_MODE: tl.constexpr,
    ONE_KEY_TILE: tl.constexpr,
    SPLIT_Q: tl.constexpr,
    Q_GRID_W: tl.constexpr,
    K_GRID_W: tl.constexpr,
    Q_STEP: tl.constexpr,
    WIN_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """The whole backward of short sequences (every query in one BLOCK_M tile) in one pass over the scores: per
    batch entry, per key block, P and dS once, and from them dv and dk of the key block, dq accumulated over key
    blocks, and dS for the bias gradient.

    Grid: (H, chunks, query blocks); a program owns one head, one query block and the batch entries
    [chunk * batch_per_chunk, ...) of its chunk, in order. Without ``SPLIT_Q`` one query block holds every query.
    With it (more queries than one tile holds) a program gives dq, dS and delta = rowsum(dout * out) (into
    delta_ptr, (B, H, NQ) fp32) of its query block, and :func:`_attention_bwd_dkdv_kernel` dk and dv.

    DS_MODE 0: no bias gradient. DS_MODE 1 (table / biases): dS summed over the chunk's batch entries in a fixed
    order into ds_ptr (chunks, H, NQ, NK) fp32 through its strides, the sum kept in registers where one key
    block covers the keys (ONE_KEY_TILE), else read back and added per key block by the program that wrote it.
    DS_MODE 2 (dense bias): dS of each batch entry into ds_ptr (B, H, NQ, NK) through its strides. The window
    geometry (``Q_GRID_W``, ``K_GRID_W``, ``Q_STEP``, ``WIN_H``, as the runtime arguments of
    :func:`_attention_fwd_kernel`) is compile-time here, so the bias index has no runtime division; a table
    (mode 1) is read in its scaled form (bias_ptr, query_part_ptr, key_part_ptr from :func:`_table_args`). Other
    pointers as in :func:`_attention_bwd_dq_kernel` and :func:`_attention_bwd_dkdv_kernel`.
    """
    h = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    b_lo = chunk * batch_per_chunk
    b_hi = tl.minimum(B, b_lo + batch_per_chunk)
    if SPLIT_Q:
        q_rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        q_rows = tl.arange(0, BLOCK_M)  # (with a row offset of program_id 0, sm_80 spills a few bytes at 64 x 16)
    rows = q_rows[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    offs_dv = tl.arange(0, BLOCK_DV)[None, :]
    qk_scale = scale * LOG2E
    ds_chunk = ds_ptr + chunk * stride_dsb + h * stride_dsh
    ds_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if BIAS_MODE == 1:
        scaled = (bias_ptr + h * stride_biash, tl.load(query_part_ptr + rows), key_part_ptr)  # _table_scores
    for b in range(b_lo, b_hi):
        bh = b * H + h
        q_base, k_base, v_base = _head_bases(
            q_ptr, k_ptr, v_ptr, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
        )
        bias_base = _head_base(bias_ptr, b, h, stride_biasb, stride_biash)
        bias = (bias_base, stride_biasm, stride_biasn, Q_GRID_W, K_GRID_W, Q_STEP, WIN_H)
        window_mask = _window_base(attn_mask_ptr, b, num_windows, NQ, NK)
        q = _load_tile(q_base, rows, offs_d, stride_qn, stride_qd, NQ, D)
        do = _load_tile(dout_ptr + bh * NQ * DV, rows, offs_dv, DV, 1, NQ, DV)
        o = _load_tile(out_ptr + bh * NQ * DV, rows, offs_dv, DV, 1, NQ, DV)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        if SPLIT_Q:
            tl.store(delta_ptr + bh * NQ + q_rows, delta, mask=q_rows < NQ)
        lse2 = _safe_lse2(lse_ptr + bh * NQ, q_rows, NQ)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, NK, BLOCK_N):
            kj = start_n + cols
            keys = start_n + tl.arange(0, BLOCK_N)[:, None]
            mask = (rows < NQ) & (kj < NK)
            k = _load_tile(k_base, keys, offs_d, stride_kn, stride_kd, NK, D)
            v = _load_tile(v_base, keys, offs_dv, stride_vn, stride_vd, NK, DV)
            if BIAS_MODE == 1:
                # padding keys score -inf; padding queries have zero dout and delta, so their dS is 0
                s = _table_scores(q, tl.trans(k), qk_scale, scaled, window_mask, rows, kj, mask, NK, HAS_MASK)
                p = tl.math.exp2(s - lse2[:, None])
            else:
                s = _scores(q, tl.trans(k), qk_scale, bias, window_mask, rows, kj, mask, NK, BIAS_MODE, HAS_MASK)
                p = tl.where(mask, tl.math.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if not SPLIT_Q:
                dv_block = tl.dot(tl.trans(p.to(do.dtype)), do)
                dk_block = tl.dot(tl.trans(ds.to(q.dtype)), q)
            dq += tl.dot(ds.to(k.dtype), k)
            if not SPLIT_Q:
                tl.store(
                    dk_ptr + bh * NK * D + keys * D + offs_d,
                    (dk_block * scale).to(dk_ptr.dtype.element_ty),
                    mask=(keys < NK) & (offs_d < D),
                )
                tl.store(
                    dv_ptr + bh * NK * DV + keys * DV + offs_dv,
                    dv_block.to(dv_ptr.dtype.element_ty),
                    mask=(keys < NK) & (offs_dv < DV),
                )
            if DS_MODE == 1:
                if ONE_KEY_TILE:
                    ds_sum += ds
                else:
                    ds_ptrs = ds_chunk + rows * stride_dsm + kj * stride_dsn
                    if b > b_lo:
                        ds += tl.load(ds_ptrs, mask=mask, other=0.0)
                    tl.store(ds_ptrs, ds, mask=mask)
                    # the next batch entry's read of this block may land on other threads of the program
                    tl.debug_barrier()
            if DS_MODE == 2:
                ds_ptrs = ds_ptr + b * stride_dsb + h * stride_dsh + rows * stride_dsm + kj * stride_dsn
                tl.store(ds_ptrs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        tl.store(
            dq_ptr + bh * NQ * D + rows * D + offs_d,
            (dq * scale).to(dq_ptr.dtype.element_ty),
            mask=(rows < NQ) & (offs_d < D),
        )
    if DS_MODE == 1:
        if ONE_KEY_TILE:
            tl.store(ds_chunk + rows * stride_dsm + cols * stride_dsn, ds_sum, mask=(rows < NQ) & (cols < NK))


@triton.jit
def _attention_bins_kernel(
    ds_ptr, index_ptr, grad_ptr, PAIRS, ENTRIES, SLOTS, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr
):
    """The table / biases gradient from dS summed over the batch: grad[h, e] = the sum of ds[h, pair] over the pairs
    (i * NK + j) whose bias entry is e, listed in index_ptr (ENTRIES, SLOTS) int32 and padded with -1, summed in
    slot order (deterministic). Grid: (H, cdiv(ENTRIES, BLOCK_E)); ds_ptr: (H, PAIRS) fp32, grad_ptr: (H, ENTRIES)
    fp32, contiguous."""
    h = tl.program_id(0).to(tl.int64)
    entries = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_E], tl.float32)
    for s0 in range(0, SLOTS, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        ok = (entries[:, None] < ENTRIES) & (slots[None, :] < SLOTS)
        pair = tl.load(index_ptr + entries[:, None] * SLOTS + slots[None, :], mask=ok, other=-1)
        acc += tl.sum(tl.load(ds_ptr + h * PAIRS + pair, mask=pair >= 0, other=0.0), 1)
    tl.store(grad_ptr + h * ENTRIES + entries, acc, mask=entries < ENTRIES)


# --- launchers --------------------------------------------------------------------------------------------------


def _head_block(d: int, dv: int) -> int:
    """BLOCK_D = BLOCK_DV: the power of two >= 16 covering both head dims. One size for both bounds the number of
    configs (LeViT's 16/64 pads q and k to 64 columns: masked loads, extra MMA work on zeros only)."""
    return max(MIN_BLOCK, triton.next_power_of_2(max(d, dv)))


def _fwd_config(nq: int, nk: int, d: int, dv: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and warps of :func:`_attention_fwd_kernel`. A 16 x 16 tile holds a whole short sequence
    (LeViT's 16 tokens), one warp per 32 head columns (16 for fp32); longer sequences take 64 x 64 tiles on 8 warps
    for head dims up to 32 (CoAtNet, Swin, LeViT keys) and 32 x 32 tiles on 4 warps for wider heads. fp32 keeps
    16 x 16 tiles: its dots run exact ("ieee", on FMA units), which only small tiles afford without spilling. Before
    triton 3.8 (``_compat.NARROW_TILES``) the long tiles are 32 x 32 on 4 warps, on 8 for 128-wide heads."""
    block = _head_block(d, dv)
    if dtype == torch.float32 or max(nq, nk) <= SHORT_TOKENS:
        columns = FP32_HEAD_COLUMNS_PER_WARP if dtype == torch.float32 else HEAD_COLUMNS_PER_WARP
        tile, warps = MIN_BLOCK, max(1, block // columns)
    elif block <= WIDE_TILE_MAX_HEAD:
        tile, warps = (LONG_TILE // 2, 4) if NARROW_TILES else (LONG_TILE, 8)
    else:
        tile, warps = LONG_TILE // 2, 8 if NARROW_TILES and block == MAX_HEAD_BLOCK else 4
    return {"BLOCK_M": tile, "BLOCK_N": tile, "BLOCK_D": block, "BLOCK_DV": block, "num_warps": warps}


def _fwd_short_config(
    nq: int, nk: int, d: int, dv: int, dtype: torch.dtype, bias_mode: int = 0, has_mask: bool = False
) -> dict[str, int] | None:
    """Block sizes and warps of :func:`_attention_fwd_short_kernel`, or None where it does not apply (fp32, whose
    exact dots keep :func:`_fwd_config`'s tiles; more than SHORT_MAX_TOKENS keys; head blocks over
    SHORT_MAX_FWD_HEAD). One 16 x 16 tile where it holds every query and key (one warp per 32 head columns, as
    :func:`_fwd_config`), else 64-row tiles: up to 64 keys one 64-key block (a one-pass softmax), past that
    streamed blocks of SHORT_FWD_STREAM_N keys. The 64 x 64 tile takes SHORT_FWD_WARPS warps, one warp group,
    whose warp-group MMAs hold the scores in 32 registers a thread, where no score-sized tile is gathered per
    batch entry (a table / biases bias is gathered once per program); with a mask or a dense bias, whose
    per-entry gathers hold a 64-bit address per score, 2 * SHORT_FWD_WARPS warps. The streamed 64 x 32 tiles
    take SHORT_FWD_WARPS warps: half the scores and addresses a thread, at least two blocks per SM (64 x 64 there
    holds one block on 8 warps; the kernel report's and the perf model's figures). Not with a mask past 64 keys
    beside head blocks over SHORT_MAX_HEAD, which spills."""
    block = _head_block(d, dv)
    if dtype == torch.float32 or block > SHORT_MAX_FWD_HEAD or nk > SHORT_MAX_TOKENS:
        return None
    if max(nq, nk) <= MIN_BLOCK:
        warps = max(1, block // HEAD_COLUMNS_PER_WARP)
        return {"BLOCK_M": MIN_BLOCK, "BLOCK_N": MIN_BLOCK, "BLOCK_D": block, "BLOCK_DV": block, "num_warps": warps}
    if nk > LONG_TILE:
        if has_mask and block > SHORT_MAX_HEAD:
            return None  # a mask beside streamed 64-wide heads spills on sm_90
        n = SHORT_FWD_STREAM_N
        return {"BLOCK_M": LONG_TILE, "BLOCK_N": n, "BLOCK_D": block, "BLOCK_DV": block, "num_warps": SHORT_FWD_WARPS}
    gathers = has_mask or bias_mode == BIAS_DENSE
    warps = 2 * SHORT_FWD_WARPS if gathers else SHORT_FWD_WARPS
    return {"BLOCK_M": LONG_TILE, "BLOCK_N": LONG_TILE, "BLOCK_D": block, "BLOCK_DV": block, "num_warps": warps}


def _bwd_config(nq: int, nk: int, d: int, dv: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and warps of :func:`_attention_bwd_dq_kernel` and :func:`_attention_bwd_dkdv_kernel` (the same
    tiles, transposed). The backward holds four score-sized tiles (S, P, dP, dS) and two accumulators: short
    sequences and fp32 take 16 x 16 tiles with one warp per 16 head columns (at least 2), long ones 32 x 32 tiles
    on 4 warps (8 for 128-wide heads). Before triton 3.8 (``_compat.NARROW_TILES``) the short tiles take at least 4
    warps."""
    block = _head_block(d, dv)
    if dtype == torch.float32 or max(nq, nk) <= SHORT_TOKENS:
        tile, warps = MIN_BLOCK, max(4 if NARROW_TILES else 2, block // BWD_HEAD_COLUMNS_PER_WARP)
    else:
        tile, warps = LONG_TILE // 2, 4 if block < MAX_HEAD_BLOCK else 8
    return {"BLOCK_M": tile, "BLOCK_N": tile, "BLOCK_D": block, "BLOCK_DV": block, "num_warps": warps}


def _dkdv_config(nq: int, nk: int, d: int, dv: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and warps of :func:`_attention_bwd_dkdv_kernel`: :func:`_bwd_config`'s, but for fp16 / bf16 past
    SHORT_TOKENS tokens and head blocks under MAX_HEAD_BLOCK (whose accumulators spill there) 64-key blocks beside
    16-query blocks on DKDV_WARPS warps. The keys are the rows of its transposed tiles, so on sm_90 the 64 keys are
    a warp-group MMA's 64 rows, and dk, dv and the score tiles fit in one warp group's registers (the kernel
    report's figures; 32 x 32 tiles run as warp-level MMAs there)."""
    config = _bwd_config(nq, nk, d, dv, dtype)
    if dtype == torch.float32 or max(nq, nk) <= SHORT_TOKENS or _head_block(d, dv) == MAX_HEAD_BLOCK:
        return config
    return {**config, "BLOCK_M": MIN_BLOCK, "BLOCK_N": LONG_TILE, "num_warps": DKDV_WARPS}


def _short_config(
    nq: int, nk: int, d: int, dv: int, dtype: torch.dtype, has_mask: bool = False
) -> dict[str, int] | None:
    """Block sizes, ``SPLIT_Q`` and warps of :func:`_attention_bwd_short_kernel`, or None where it does not apply
    (fp32, whose exact dots keep 16 x 16 tiles; head blocks over SPLIT_MAX_HEAD; more than SHORT_MAX_TOKENS
    queries or keys).

    Up to SHORT_MAX_QUERIES queries and head blocks of SHORT_MAX_HEAD, the query tile holds every query: 16 or 64
    rows. Beside 16 rows the key blocks are 64 keys wide (16 for up to 16 keys); beside 64 rows, 16: on sm_90 the
    products run as warp-group MMAs whose 64-row accumulators sit in one warp group's registers, and the four
    score-sized tiles (S, P, dP, dS) beside the dq, dk and dv accumulators fit without spilling only that narrow.
    The 16 x 16 tile takes 4 warps; the 64 x 16 tile too, one warp group, on triton 3.8 and without a mask (about
    210 registers a thread: two blocks per SM, where 8 warps of about 170 fit one; with a mask, or on older
    triton, 4 warps spill), else 8; the 16 x 64 tile 8 (more would not fit 255 registers a thread).

    Past that (more queries, or head blocks up to SPLIT_MAX_HEAD) the queries are split, without dk and dv
    accumulators: 64 x SPLIT_BLOCK_N tiles on SPLIT_WARPS warps (4 spill on sm_80; wider key blocks cost more on
    the perf model), 16 x 16 tiles on 4 warps for head blocks over SHORT_MAX_HEAD (64 rows spill on sm_90 even on
    8). The figures are the kernel report's. The dS sum of a chunk stays in registers only in the 16 x 16 tile
    (:func:`_one_key_tile`)."""
    block = _head_block(d, dv)
    if dtype == torch.float32 or block > SPLIT_MAX_HEAD or max(nq, nk) > SHORT_MAX_TOKENS:
        return None
    if nq > SHORT_MAX_QUERIES or block > SHORT_MAX_HEAD:
        block_m, warps = (LONG_TILE, SPLIT_WARPS) if block <= SHORT_MAX_HEAD else (MIN_BLOCK, 4)
        return {
            "BLOCK_M": block_m,
            "BLOCK_N": SPLIT_BLOCK_N,
            "BLOCK_D": block,
            "BLOCK_DV": block,
            "SPLIT_Q": True,
            "num_warps": warps,
        }
    block_m = MIN_BLOCK if nq <= MIN_BLOCK else LONG_TILE
    block_n = MIN_BLOCK if nk <= MIN_BLOCK or block_m == LONG_TILE else LONG_TILE
    one_group = block_m == MIN_BLOCK or not (NARROW_TILES or has_mask)
    warps = 4 if block_n == MIN_BLOCK and one_group else 8
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block, "BLOCK_DV": block, "SPLIT_Q": False}
    return {**config, "num_warps": warps}


def _one_key_tile(config: dict[str, int], nk: int) -> bool:
    """Whether :func:`_attention_bwd_short_kernel` keeps a chunk's dS sum in registers: one 16 x 16 tile holds
    every score (in the larger tiles the sum spills; it is read back per key block there)."""
    return nk <= config["BLOCK_N"] == MIN_BLOCK and config["BLOCK_M"] == MIN_BLOCK


def _short_chunks(batch: int, heads: int, q_blocks: int, nq: int, nk: int, table_grad: bool) -> tuple[int, int]:
    """(chunks, batch entries per chunk) of the short kernels, whose programs are heads x q_blocks x chunks: about
    TARGET_PROGRAMS programs, and with a table gradient at most SHORT_DS_BYTES of dS partials ((chunks, heads, nq,
    nk) fp32)."""
    chunks = min(batch, triton.cdiv(TARGET_PROGRAMS, heads * q_blocks))
    if table_grad:
        chunks = min(chunks, max(1, SHORT_DS_BYTES // (heads * nq * nk * 4)))
    per_chunk = triton.cdiv(batch, max(chunks, 1))
    return triton.cdiv(batch, per_chunk), per_chunk


def _table_config(d: int, dv: int) -> dict[str, int]:
    """Block sizes, warps and stages of :func:`_attention_bwd_table_kernel`. One BLOCK_G for every table: the bins
    are folded once per x-block pair, not per tile, so a wide block costs little. No software pipelining: the
    inner loop's loads are small and the prefetch buffers would spill. Before triton 3.8 (``_compat.NARROW_TILES``)
    heads wider than 32 take 32-wide bin blocks."""
    block = _head_block(d, dv)
    return {
        "BLOCK_X": TABLE_BLOCK_X,
        "BLOCK_G": TABLE_BLOCK_G // 2 if NARROW_TILES and block > TABLE_NARROW_HEAD else TABLE_BLOCK_G,
        "BLOCK_D": block,
        "BLOCK_DV": block,
        "num_warps": 4 if block <= TABLE_NARROW_HEAD else 8,
        "num_stages": 1,
    }


def _geometry(bias_mode: int, geometry: list[int]) -> dict[str, int]:
    """Token grids of the bias modes: query / key grid widths and heights, the query step on the key grid, the
    window height, and the row / column offset counts of the table gradient."""
    if bias_mode == BIAS_REL_POS:
        wh, ww = geometry
        return {
            "q_grid_w": ww,
            "k_grid_w": ww,
            "q_step": 1,
            "win_h": wh,
            "q_grid_h": wh,
            "k_grid_h": wh,
            "num_dy": 2 * wh - 1,
            "num_bins": 2 * ww - 1,
        }
    if bias_mode == BIAS_LEVIT:
        res, stride = geometry
        res_q = (res - 1) // stride + 1
        return {
            "q_grid_w": res_q,
            "k_grid_w": res,
            "q_step": stride,
            "win_h": res,
            "q_grid_h": res_q,
            "k_grid_h": res,
            "num_dy": res,
            "num_bins": res,
        }
    return {
        "q_grid_w": 1,
        "k_grid_w": 1,
        "q_step": 1,
        "win_h": 1,
        "q_grid_h": 1,
        "k_grid_h": 1,
        "num_dy": 1,
        "num_bins": 1,
    }


def _geometry_constexprs(geo: dict[str, int]) -> dict[str, int]:
    """The compile-time geometry arguments of the short kernels from :func:`_geometry`."""
    return {"Q_GRID_W": geo["q_grid_w"], "K_GRID_W": geo["k_grid_w"], "Q_STEP": geo["q_step"], "WIN_H": geo["win_h"]}


def _bias_strides(bias: torch.Tensor | None, bias_mode: int) -> tuple[int, int, int, int]:
    """(stride_biasb, stride_biash, stride_biasm, stride_biasn) as :func:`_bias_tile` reads them."""
    if bias_mode == BIAS_REL_POS:
        return 0, bias.stride(1), bias.stride(0), 0
    if bias_mode == BIAS_LEVIT:
        return 0, bias.stride(0), bias.stride(1), 0
    if bias_mode == BIAS_DENSE:
        return tuple(0 if size == 1 else stride for size, stride in zip(bias.shape, bias.stride()))
    return 0, 0, 0, 0


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The (pointer, num_windows) pair the kernels take for ``mask``; q stands in for the pointer when there is none
    (HAS_MASK is False then and the kernels never read it)."""
    if mask is None:
        return q, 1
    return mask, mask.shape[0]


def _shared_args(q, k, v, bias, mask, bias_mode, geometry, scale) -> tuple:
    """What the forward, dq and dkdv kernels share, as (bias pointer, mask pointer, strides, sizes, options): the
    pointers as :func:`_mask_args` (q standing in for an absent bias too); the q, k, v and bias strides; H, NQ, NK,
    D, DV, scale, the query / key grids and the number of mask windows; the switches and launch options."""
    geo = _geometry(bias_mode, geometry)
    mask_arg, num_windows = _mask_args(mask, q)
    strides = (*q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias, bias_mode))
    sizes = (q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3], scale)
    sizes += (geo["q_grid_w"], geo["k_grid_w"], geo["q_step"], geo["win_h"], num_windows)
    options = {"BIAS_MODE": bias_mode, "HAS_MASK": mask is not None, "num_stages": NUM_STAGES, "maxnreg": MAX_REGISTERS}
    return q if bias is None else bias, mask_arg, strides, sizes, options


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    bias_mode: int,
    geometry: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) through their strides; bias per ``bias_mode``
    (module docstring); mask None or (num_windows, Nq, Nk) contiguous, added to batch entry b's scores as
    mask[b % num_windows]. Returns out (B, H, Nq, Dv) contiguous in q's dtype and lse (B, H, Nq) fp32."""
    batch, heads, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    out = torch.empty((batch, heads, nq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, nq), dtype=torch.float32, device=q.device)
    short = _fwd_short_config(nq, nk, d, dv, q.dtype, bias_mode, mask is not None)
    if short is not None and _fwd_short_aligned(q, k, v):
        _short_fwd(short, q, k, v, bias, mask, bias_mode, geometry, scale, out, lse)
        return out, lse
    config = _fwd_config(nq, nk, d, dv, q.dtype)
    grid = (triton.cdiv(nq, config["BLOCK_M"]), batch * heads)
    bias_arg, mask_arg, strides, sizes, options = _shared_args(q, k, v, bias, mask, bias_mode, geometry, scale)
    _attention_fwd_kernel[grid](q, k, v, bias_arg, mask_arg, out, lse, *strides, *sizes, **options, **config)
    return out, lse


def _fwd_short_aligned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`_attention_fwd_short_kernel` takes q, k and v: unit strides along the head dim, and the head
    dims and every other stride multiples of SHORT_FWD_ALIGN elements (what its kernel-report variants are compiled
    for, :data:`SHORT_FWD_ALIGNED`: Triton specialises such arguments, and the variants without that assumption
    hold more registers than the tiles leave). Every q / k / v a ``reshape`` and ``permute`` of a linear layer's
    output with head dims of 16, 32 or 64 passes."""
    sizes = (q.shape[3], v.shape[3], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    return q.stride(3) == k.stride(3) == v.stride(3) == 1 and all(size % SHORT_FWD_ALIGN == 0 for size in sizes)


def _short_fwd(config, q, k, v, bias, mask, bias_mode, geometry, scale, out, lse) -> None:
    """out and lse through :func:`_attention_fwd_short_kernel`: about TARGET_PROGRAMS programs, each a query block
    of one head over a chunk of the batch. q, k and v have unit strides along the head dim (the kernel's tiles are
    compile-time contiguous along it)."""
    batch, heads, nq, _ = q.shape
    nk = k.shape[2]
    q_blocks = triton.cdiv(nq, config["BLOCK_M"])
    chunks, per_chunk = _short_chunks(batch, heads, q_blocks, nq, nk, False)
    geo = _geometry(bias_mode, geometry)
    mask_arg, num_windows = _mask_args(mask, q)
    one_key_tile = nk <= config["BLOCK_N"]
    bias_arg, query_parts, key_parts, bias_strides = q if bias is None else bias, q, q, _bias_strides(bias, bias_mode)
    if bias_mode == BIAS_REL_POS and not one_key_tile:
        bias_arg, query_parts, key_parts, bias_strides = _table_args(bias, geometry, nq, nk, config)
    _attention_fwd_short_kernel[(q_blocks, heads, chunks)](
        q,
        k,
        v,
        bias_arg,
        query_parts,
        key_parts,
        mask_arg,
        out,
        lse,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *bias_strides,
        batch,
        heads,
        nq,
        nk,
        q.shape[3],
        v.shape[3],
        scale,
        num_windows,
        per_chunk,
        BIAS_MODE=bias_mode,
        HAS_MASK=mask is not None,
        ONE_KEY_TILE=one_key_tile,
        **_geometry_constexprs(geo),
        num_stages=NUM_STAGES if one_key_tile else SHORT_FWD_STREAM_STAGES,
        maxnreg=MAX_REGISTERS,
        **config,
    )


def _table_args(
    table: torch.Tensor, geometry: list[int], nq: int, nk: int, config: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """A relative-position table ((entries, H), any strides and dtype) as :func:`_scaled_bias` reads it: (the
    scaled table, query parts, key parts, the four bias strides of the kernels' arguments). The scaled table is
    (H, 2 * entries) fp32, row h log2(e) * table[:, h] then entries times -inf: the product the kernels form from
    the stored table (fp32, log2(e) rounded to fp32). The parts are int32 vectors padded to whole blocks
    (:func:`_table_parts`)."""
    entries, heads = table.shape
    scaled = torch.full((heads, 2 * entries), float("-inf"), dtype=torch.float32, device=table.device)
    scaled[:, :entries] = table.t().float() * _LOG2E_FP32  # a 0-dim CPU tensor: a scalar, no copy to the device
    query_parts, key_parts = _table_parts(tuple(geometry), nq, nk, config["BLOCK_M"], config["BLOCK_N"], table.device)
    return scaled, query_parts, key_parts, (0, scaled.stride(0), 1, 0)


@functools.lru_cache(maxsize=32)
def _table_parts(
    geometry: tuple[int, int], nq: int, nk: int, block_m: int, block_n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of a relative-position table index on a (Wh, Ww) window, int32: token i at (yi, xi) has
    query part (yi + Wh - 1) * (2Ww - 1) + xi + Ww - 1 and key part yi * (2Ww - 1) + xi, and the table entry of
    query i and key j is query part(i) - key part(j) (:func:`_bias_stored`'s index). The query parts are padded to
    a whole number of block_m queries with the last query's (padding rows read real entries and are never stored),
    the key parts to whole blocks of block_n keys with -entries: query part minus that lies in the scaled table's
    -inf half (:func:`_table_args`)."""
    wh, ww = geometry
    row = 2 * ww - 1
    tokens = torch.arange(max(nq, nk))
    y, x = tokens // ww, tokens % ww
    query = torch.full((triton.cdiv(nq, block_m) * block_m,), 0, dtype=torch.int32)
    query[:nq] = (y[:nq] + wh - 1) * row + x[:nq] + ww - 1
    query[nq:] = query[nq - 1]
    key = torch.full((triton.cdiv(nk, block_n) * block_n,), -row * (2 * wh - 1), dtype=torch.int32)
    key[:nk] = y[:nk] * row + x[:nk]
    return query.to(device), key.to(device)


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    bias_mode: int,
    geometry: list[int],
    scale: float,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: dout and out (B, H, Nq, Dv) contiguous, lse (B, H, Nq) from :func:`attention_fwd`, the rest as
    there. Returns dq, dk, dv (contiguous, in q's dtype) and dbias in the bias's own shape and dtype (reduced over
    broadcast dims for a dense bias), an empty tensor unless ``bias_grad``."""
    batch, heads, nq, d = q.shape
    nk, dv_dim = k.shape[2], v.shape[3]
    dout = dout.contiguous()
    out = out.contiguous()
    dq = torch.empty((batch, heads, nq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads, nk, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((batch, heads, nk, dv_dim), dtype=q.dtype, device=q.device)
    dense_grad = bias_grad and bias_mode == BIAS_DENSE
    full_shape = (batch, heads, nq, nk)
    ds_target = None
    if dense_grad:
        # a bias of the full shape takes dS directly; a broadcast one needs dS summed over its broadcast dims
        same_shape = tuple(bias.shape) == full_shape
        ds_target = torch.empty(full_shape, dtype=bias.dtype if same_shape else torch.float32, device=q.device)
    tensors = (dout, q, k, v, out, lse, bias, mask)
    short = _short_config(nq, nk, d, dv_dim, q.dtype, mask is not None)
    if short is not None:
        ds_sum = _short_bwd(short, tensors, bias_mode, geometry, scale, bias_grad, (dq, dk, dv), ds_target)
    else:
        delta = torch.empty((batch, heads, nq), dtype=torch.float32, device=q.device)
        _long_bwd(tensors, bias_mode, geometry, scale, (dq, dk, dv), delta, ds_target)
    if not bias_grad:
        dbias = q.new_empty(0)
    elif dense_grad:
        reduce_dims = [dim for dim in range(4) if bias.shape[dim] == 1 and full_shape[dim] != 1]
        dbias = ds_target.sum(reduce_dims, keepdim=True).to(bias.dtype) if reduce_dims else ds_target
    elif short is not None:
        dbias = _table_from_pairs(ds_sum, bias, bias_mode, geometry)
    else:
        dbias = _table_grad(dout, q, k, v, lse, delta, bias, mask, bias_mode, geometry, scale)
    return dq, dk, dv, dbias


def _long_bwd(tensors, bias_mode, geometry, scale, grads, delta, ds_target) -> None:
    """dq, dk, dv (``grads``) through :func:`_attention_bwd_dq_kernel` (which also writes delta, and dS into
    ``ds_target`` unless that is None) and :func:`_attention_bwd_dkdv_kernel`."""
    dout, q, k, v, out, lse, bias, mask = tensors
    dq, dk, dv = grads
    batch, heads, nq, d = q.shape
    nk, dv_dim = k.shape[2], v.shape[3]
    bias_arg, mask_arg, strides, sizes, options = _shared_args(q, k, v, bias, mask, bias_mode, geometry, scale)
    config = _bwd_config(nq, nk, d, dv_dim, q.dtype)
    dense_grad = ds_target is not None
    _attention_bwd_dq_kernel[(triton.cdiv(nq, config["BLOCK_M"]), batch * heads)](
        dout,
        q,
        k,
        v,
        out,
        lse,
        delta,
        bias_arg,
        mask_arg,
        dq,
        ds_target if dense_grad else delta,
        *strides,
        *(ds_target.stride() if dense_grad else (0, 0, 0, 0)),
        *sizes,
        BIAS_GRAD=dense_grad,
        **options,
        **config,
    )
    _dkdv_bwd(tensors, bias_mode, geometry, scale, (dk, dv), delta)


def _dkdv_bwd(tensors, bias_mode, geometry, scale, grads, delta) -> None:
    """dk, dv (``grads``) through :func:`_attention_bwd_dkdv_kernel`, from delta = rowsum(dout * out)."""
    dout, q, k, v, out, lse, bias, mask = tensors
    dk, dv = grads
    batch, heads, nq, d = q.shape
    nk, dv_dim = k.shape[2], v.shape[3]
    bias_arg, mask_arg, strides, sizes, options = _shared_args(q, k, v, bias, mask, bias_mode, geometry, scale)
    config = _dkdv_config(nq, nk, d, dv_dim, q.dtype)
    query_parts = key_parts = q
    if bias_mode == BIAS_REL_POS:
        bias_arg, query_parts, key_parts, bias_strides = _table_args(bias, geometry, nq, nk, config)
        strides = (*strides[:12], *bias_strides)
    _attention_bwd_dkdv_kernel[(triton.cdiv(nk, config["BLOCK_N"]), batch * heads)](
        dout,
        q,
        k,
        v,
        lse,
        delta,
        bias_arg,
        query_parts,
        key_parts,
        mask_arg,
        dk,
        dv,
        *strides,
        *sizes,
        **options,
        **config,
    )


def _short_bwd(config, tensors, bias_mode, geometry, scale, bias_grad, grads, ds_target) -> torch.Tensor | None:
    """dq, dk, dv (``grads``) through :func:`_attention_bwd_short_kernel`, with dS of every batch entry into
    ``ds_target`` (a dense bias's gradient) unless that is None. Returns, for a table / biases gradient, dS summed
    over the batch as (H, Nq * Nk) fp32 (the kernel's chunk partials summed over chunks in order), else None."""
    dout, q, k, v, out, lse, bias, mask = tensors
    dq, dk, dv = grads
    batch, heads, nq, _ = q.shape
    nk = k.shape[2]
    table_grad = bias_grad and bias_mode in (BIAS_REL_POS, BIAS_LEVIT)
    q_blocks = triton.cdiv(nq, config["BLOCK_M"])
    chunks, per_chunk = _short_chunks(batch, heads, q_blocks, nq, nk, table_grad)
    split = config["SPLIT_Q"]
    delta = torch.empty((batch, heads, nq), dtype=torch.float32, device=q.device) if split else lse
    if table_grad:
        ds = torch.empty((chunks, heads, nq, nk), dtype=torch.float32, device=q.device)
        ds_mode = 1
    elif ds_target is not None:
        ds, ds_mode = ds_target, 2
    else:
        ds, ds_mode = lse, 0
    geo = _geometry(bias_mode, geometry)
    mask_arg, num_windows = _mask_args(mask, q)
    config = dict(config)
    bias_arg, query_parts, key_parts, bias_strides = q if bias is None else bias, q, q, _bias_strides(bias, bias_mode)
    if bias_mode == BIAS_REL_POS:
        bias_arg, query_parts, key_parts, bias_strides = _table_args(bias, geometry, nq, nk, config)
    _attention_bwd_short_kernel[(heads, chunks, q_blocks)](
        dout,
        q,
        k,
        v,
        out,
        lse,
        delta,
        bias_arg,
        query_parts,
        key_parts,
        mask_arg,
        dq,
        dk,
        dv,
        ds,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias_strides,
        *(ds.stride() if ds_mode else (0, 0, 0, 0)),
        batch,
        heads,
        nq,
        nk,
        q.shape[3],
        v.shape[3],
        scale,
        num_windows,
        per_chunk,
        BIAS_MODE=bias_mode,
        HAS_MASK=mask is not None,
        DS_MODE=ds_mode,
        ONE_KEY_TILE=ds_mode == 1 and _one_key_tile(config, nk),
        **_geometry_constexprs(geo),
        num_stages=NUM_STAGES,
        maxnreg=MAX_REGISTERS,
        **config,
    )
    if split:
        _dkdv_bwd(tensors, bias_mode, geometry, scale, (dk, dv), delta)
    if not table_grad:
        return None
    return (ds.sum(0) if chunks > 1 else ds[0]).reshape(heads, nq * nk)


@functools.lru_cache(maxsize=32)
def _pair_index(bias_mode: int, geometry: tuple[int, ...], nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """For each table / biases entry, the (query, key) pairs i * nk + j whose bias it is, as an (entries, slots)
    int32 tensor padded with -1 (the pairs in increasing order), from the index of :func:`_bias_tile`."""
    geo = _geometry(bias_mode, list(geometry))
    qi = torch.arange(nq)[:, None]
    kj = torch.arange(nk)[None, :]
    yi, xi = (qi // geo["q_grid_w"]) * geo["q_step"], (qi % geo["q_grid_w"]) * geo["q_step"]
    yj, xj = kj // geo["k_grid_w"], kj % geo["k_grid_w"]
    if bias_mode == BIAS_REL_POS:
        entry = (yi - yj + geo["win_h"] - 1) * (2 * geo["k_grid_w"] - 1) + (xi - xj + geo["k_grid_w"] - 1)
    else:
        entry = (yi - yj).abs() * geo["k_grid_w"] + (xi - xj).abs()
    entry = entry.flatten()
    entries = geo["num_dy"] * geo["num_bins"]
    order = torch.argsort(entry, stable=True)
    counts = torch.bincount(entry, minlength=entries)
    starts = torch.cumsum(counts, 0) - counts
    sorted_entry = entry[order]
    index = torch.full((entries, max(1, int(counts.max()))), -1, dtype=torch.int32)
    index[sorted_entry, torch.arange(entry.numel()) - starts[sorted_entry]] = order.to(torch.int32)
    return index.to(device)


def _table_from_pairs(ds_sum: torch.Tensor, bias: torch.Tensor, bias_mode: int, geometry: list[int]) -> torch.Tensor:
    """The table (mode 1) or biases (mode 2) gradient from dS summed over the batch, (H, Nq * Nk) fp32, through
    :func:`_attention_bins_kernel`, in the bias's shape and dtype."""
    heads, pairs = ds_sum.shape
    geo = _geometry(bias_mode, geometry)
    nk = geo["k_grid_w"] * geo["k_grid_h"]
    index = _pair_index(bias_mode, tuple(geometry), pairs // nk, nk, ds_sum.device)
    entries, slots = index.shape
    grad = torch.empty((heads, entries), dtype=torch.float32, device=ds_sum.device)
    _attention_bins_kernel[(heads, triton.cdiv(entries, BINS_BLOCK_E))](
        ds_sum, index, grad, pairs, entries, slots, BLOCK_E=BINS_BLOCK_E, BLOCK_S=BINS_BLOCK_S
    )
    if bias_mode == BIAS_REL_POS:
        grad = grad.t()
    return grad.to(bias.dtype).contiguous()


def _table_grad(dout, q, k, v, lse, delta, bias, mask, bias_mode, geometry, scale):
    """The table (mode 1) or biases (mode 2) gradient through :func:`_attention_bwd_table_kernel`, in the bias's
    shape and dtype."""
    batch, heads, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    geo = _geometry(bias_mode, geometry)
    config = _table_config(d, dv)
    g_blocks = triton.cdiv(geo["num_bins"], config["BLOCK_G"])
    programs = heads * geo["num_dy"] * g_blocks
    batch_per_chunk = triton.cdiv(batch, min(batch, triton.cdiv(TARGET_PROGRAMS, programs)))
    chunks = triton.cdiv(batch, batch_per_chunk)
    partial = torch.empty((chunks, heads, geo["num_dy"], geo["num_bins"]), dtype=torch.float32, device=q.device)
    mask_arg, num_windows = _mask_args(mask, q)
    _attention_bwd_table_kernel[(heads, geo["num_dy"], g_blocks * chunks)](
        dout,
        q,
        k,
        v,
        lse,
        delta,
        bias,
        mask_arg,
        partial,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *_bias_strides(bias, bias_mode)[1:3],
        batch,
        heads,
        nq,
        nk,
        d,
        dv,
        scale,
        geo["q_grid_w"],
        geo["k_grid_w"],
        geo["q_step"],
        geo["win_h"],
        geo["q_grid_h"],
        geo["k_grid_h"],
        geo["num_bins"],
        batch_per_chunk,
        num_windows,
        BIAS_MODE=bias_mode,
        HAS_MASK=mask is not None,
        maxnreg=MAX_REGISTERS,
        **config,
    )
    grad = (partial.sum(0) if chunks > 1 else partial[0]).reshape(heads, -1)
    if bias_mode == BIAS_REL_POS:
        grad = grad.t()
    return grad.to(bias.dtype).contiguous()


# --- kernel report ----------------------------------------------------------------------------------------------

_FP32_POINTERS = ("lse_ptr", "delta_ptr", "partial_ptr")


def _signature(fn, dtype_name: str, constexprs: dict) -> dict[str, str]:
    """Triton types of ``fn``'s runtime arguments: fp32 pointers for lse / delta / partials, the data dtype for the
    other pointers, fp32 for the scale, i32 for sizes and strides."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype_name}"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return signature


def _scaled_signature(spec: KernelSpec) -> None:
    """A spec's pointer types where its kernel reads a table in the scaled form (:func:`_table_args`)."""
    spec.signature.update(bias_ptr="*fp32", query_part_ptr="*i32", key_part_ptr="*i32")


def _spec(name, fn, dtype, constexprs, num_warps, num_stages=NUM_STAGES):
    dtype_name = TRITON_DTYPES[dtype]
    return KernelSpec(
        name=name,
        fn=fn,
        signature=_signature(fn, dtype_name, constexprs),
        constexprs=constexprs,
        num_warps=num_warps,
        num_stages=num_stages,
        maxnreg=MAX_REGISTERS,
        meta={"dtype": dtype_name},
    )


def _configs(config_fn, block: int, dtype: torch.dtype) -> list[dict[str, int]]:
    """The distinct configs ``config_fn`` picks for head block ``block`` over short and long sequences."""
    picked = {tuple(config_fn(tokens, tokens, block, block, dtype).items()) for tokens in (1, LONG_TILE)}
    return [dict(config) for config in sorted(picked)]


# the geometry each bias mode's short-kernel configs are compiled with in the report (the launcher compiles one
# variant per geometry; these are Swin's 7 x 7 windows and LeViT's 14 x 14 keys at stride 2)
_REPORT_GEOMETRY = {
    0: {"Q_GRID_W": 1, "K_GRID_W": 1, "Q_STEP": 1, "WIN_H": 1},
    BIAS_REL_POS: {"Q_GRID_W": 7, "K_GRID_W": 7, "Q_STEP": 1, "WIN_H": 7},
    BIAS_LEVIT: {"Q_GRID_W": 7, "K_GRID_W": 14, "Q_STEP": 2, "WIN_H": 14},
    BIAS_DENSE: {"Q_GRID_W": 1, "K_GRID_W": 1, "Q_STEP": 1, "WIN_H": 1},
}


def _short_specs(dtype: torch.dtype, block: int, mode: int, has_mask: bool, tag: str) -> list[KernelSpec]:
    """Every config of :func:`_attention_bwd_short_kernel` for one dtype, head block and bias mode: each tile the
    launcher picks, each dS mode the bias mode allows (dS of a dense bias stored in fp32 or in the data dtype), and
    for the table modes the dS sum in registers (one key block) or read back per key block."""
    if dtype == torch.float32 or block > SPLIT_MAX_HEAD:
        return []
    tiles = {
        tuple(_short_config(nq, nk, block, block, dtype, has_mask).items())
        for nq in (1, SHORT_MAX_QUERIES, SHORT_MAX_TOKENS)
        for nk in (1, SHORT_MAX_TOKENS)
    }
    ds_modes = {0: [0], BIAS_REL_POS: [0, 1], BIAS_LEVIT: [0, 1], BIAS_DENSE: [0, 2]}[mode]
    specs = []
    for tile, ds_mode in itertools.product(sorted(tiles), ds_modes):
        config = dict(tile)
        warps = config.pop("num_warps")
        split = "_split" if config["SPLIT_Q"] else ""
        one_tile_choices = {_one_key_tile(config, nk) for nk in (1, SHORT_MAX_TOKENS)} if ds_mode == 1 else {False}
        ds_dtypes = ("fp32", TRITON_DTYPES[dtype]) if ds_mode == 2 else ("fp32",)
        for one_tile, ds_dtype in itertools.product(sorted(one_tile_choices), ds_dtypes):
            constexprs = {
                "BIAS_MODE": mode,
                "HAS_MASK": has_mask,
                "DS_MODE": ds_mode,
                "ONE_KEY_TILE": one_tile,
                **_REPORT_GEOMETRY[mode],
                **config,
            }
            spec = _spec(
                f"attention_bwd_short_{tag}_m{config['BLOCK_M']}n{config['BLOCK_N']}{split}_ds{ds_mode}"
                f"{'_one' if one_tile else ''}{'_' + ds_dtype if ds_mode == 2 else ''}",
                _attention_bwd_short_kernel,
                dtype,
                constexprs,
                warps,
            )
            spec.signature["ds_ptr"] = f"*{ds_dtype}"
            if mode == BIAS_REL_POS:
                _scaled_signature(spec)
            specs.append(spec)
    return specs


def _short_fwd_specs(dtype: torch.dtype, block: int, mode: int, has_mask: bool, tag: str) -> list[KernelSpec]:
    """Every config of :func:`_attention_fwd_short_kernel` for one dtype, head block and bias mode: each tile the
    launcher picks, with one key block and, where the tile's key block can be one of several, with several."""
    if _fwd_short_config(1, 1, block, block, dtype) is None:
        return []
    picked = set()
    for nq, nk in itertools.product((1, LONG_TILE), (1, LONG_TILE, SHORT_MAX_TOKENS)):
        config = _fwd_short_config(nq, nk, block, block, dtype, mode, has_mask)
        if config is not None:
            picked.add((tuple(config.items()), nk <= config["BLOCK_N"]))
    specs = []
    for tile, one_tile in sorted(picked):
        config = dict(tile)
        warps = config.pop("num_warps")
        constexprs = {
            "BIAS_MODE": mode,
            "HAS_MASK": has_mask,
            "ONE_KEY_TILE": one_tile,
            **_REPORT_GEOMETRY[mode],
            **config,
        }
        name = f"attention_fwd_short_{tag}_m{config['BLOCK_M']}n{config['BLOCK_N']}{'_one' if one_tile else ''}"
        stages = NUM_STAGES if one_tile else SHORT_FWD_STREAM_STAGES
        spec = _spec(name, _attention_fwd_short_kernel, dtype, constexprs, warps, stages)
        if mode == BIAS_REL_POS and not one_tile:
            _scaled_signature(spec)
        specs.append(dataclasses.replace(spec, aligned=SHORT_FWD_ALIGNED))
    return specs


def _bins_spec() -> KernelSpec:
    return KernelSpec(
        name="attention_bins",
        fn=_attention_bins_kernel,
        signature={
            "ds_ptr": "*fp32",
            "index_ptr": "*i32",
            "grad_ptr": "*fp32",
            "PAIRS": "i32",
            "ENTRIES": "i32",
            "SLOTS": "i32",
        },
        constexprs={"BLOCK_E": BINS_BLOCK_E, "BLOCK_S": BINS_BLOCK_S},
        num_warps=4,
        meta={"dtype": "fp32"},
    )


def report_specs() -> list[KernelSpec]:
    """Every kernel in every config the launchers can pick, for fp32, fp16 and bf16 and every bias mode; with and
    without a mask for the relative-position table (Swin's shifted windows, the mask's one public user)."""
    specs = []
    for dtype, block, mode in itertools.product(REPORT_DTYPES, HEAD_BLOCKS, BIAS_MODES):
        for has_mask in (False, True) if mode == BIAS_REL_POS else (False,):
            tag = f"mode{mode}{'_mask' if has_mask else ''}_{TRITON_DTYPES[dtype]}_d{block}"
            switches = {"BIAS_MODE": mode, "HAS_MASK": has_mask}
            for config in _configs(_fwd_config, block, dtype):
                warps = config.pop("num_warps")
                specs.append(
                    _spec(
                        f"attention_fwd_{tag}_t{config['BLOCK_M']}",
                        _attention_fwd_kernel,
                        dtype,
                        {**switches, **config},
                        warps,
                    )
                )
            for config in _configs(_dkdv_config, block, dtype):
                warps = config.pop("num_warps")
                spec = _spec(
                    f"attention_bwd_dkdv_{tag}_m{config['BLOCK_M']}n{config['BLOCK_N']}",
                    _attention_bwd_dkdv_kernel,
                    dtype,
                    {**switches, **config},
                    warps,
                )
                if mode == BIAS_REL_POS:
                    _scaled_signature(spec)
                specs.append(spec)
            for config in _configs(_bwd_config, block, dtype):
                warps = config.pop("num_warps")
                for bias_grad in (False, True) if mode == BIAS_DENSE else (False,):
                    specs.append(
                        _spec(
                            f"attention_bwd_dq_{tag}_t{config['BLOCK_M']}_grad{int(bias_grad)}",
                            _attention_bwd_dq_kernel,
                            dtype,
                            {**switches, "BIAS_GRAD": bias_grad, **config},
                            warps,
                        )
                    )
            specs += _short_fwd_specs(dtype, block, mode, has_mask, tag)
            specs += _short_specs(dtype, block, mode, has_mask, tag)
            if mode in (BIAS_REL_POS, BIAS_LEVIT):
                config = _table_config(block, block)
                warps, stages = config.pop("num_warps"), config.pop("num_stages")
                specs.append(
                    _spec(
                        f"attention_bwd_table_{tag}",
                        _attention_bwd_table_kernel,
                        dtype,
                        {**switches, **config},
                        warps,
                        stages,
                    )
                )
    return [*specs, _bins_spec()]
