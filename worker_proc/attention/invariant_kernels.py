"""The Triton kernels of the batch-invariant attention (invariant_backend.py, whose docstring states what they keep
invariant); imported on first use, so that triton is not imported where the mode is off."""

import triton
import triton.language as tl


@triton.jit
def _tile(tile_ptr, qo_ptr, seq_ptr, ext_ptr, req_ptr, r2t_ptr, num_tiles, tile, kv_head, stride_r2t,
          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """A tile's rows (their tokens, heads, validity and context lengths), its request's block table row and
    the tile's longest context."""
    b = tl.load(tile_ptr + tile)
    t0 = tl.load(tile_ptr + num_tiles + tile)
    qo_start = tl.load(qo_ptr + b)
    qo_end = tl.load(qo_ptr + b + 1)
    cached = tl.load(seq_ptr + b) - tl.load(ext_ptr + b)
    table = r2t_ptr + tl.load(req_ptr + b).to(tl.int64) * stride_r2t
    r = tl.arange(0, BLOCK_T * GROUP_PAD)
    token = t0 + r // GROUP_PAD
    head = kv_head * GROUP + r % GROUP_PAD
    row_ok = (token < qo_end) & (r % GROUP_PAD < GROUP)
    seen = cached + (token - qo_start) + 1  # this row attends to positions [0, seen)
    end = cached + tl.minimum(t0 + BLOCK_T, qo_end) - qo_start
    return token.to(tl.int64), head, row_ok, seen, table, end


@triton.jit
def _start(ROWS_: tl.constexpr, D_PAD: tl.constexpr):
    """Nothing attended yet: a running maximum of -1e30 (finite: see the invariant), sums of 0."""
    return (tl.full((ROWS_,), -1.0e30, tl.float32), tl.zeros((ROWS_,), tl.float32),
            tl.zeros((ROWS_, D_PAD), tl.float32))


@triton.jit
def _split(q, k_ptr, v_ptr, table, seen, start, stop, kv_head, stride_ks, stride_kh, qk_scale,
           ROWS_: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """One split, positions [start, stop): each row's maximum, sum of probabilities and weighted values."""
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    top, total, acc = _start(ROWS_, D_PAD)
    for chunk in range(start, stop, BLOCK_N):
        pos = chunk + tl.arange(0, BLOCK_N)
        pos_ok = pos < stop
        slots = tl.load(table + pos, mask=pos_ok, other=0).to(tl.int64)
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(pos[None, :] < tl.minimum(seen, stop)[:, None], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))
        alpha = tl.exp2(top - new_top)
        p = tl.exp2(s - new_top[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        top = new_top
    return top, total, acc


@triton.jit
def _merge(top, total, acc, s_top, s_total, s_acc):
    """The splits so far merged with the next one."""
    new_top = tl.maximum(top, s_top)
    alpha = tl.exp2(top - new_top)
    beta = tl.exp2(s_top - new_top)
    return new_top, total * alpha + s_total * beta, acc * alpha[:, None] + s_acc * beta[:, None]


@triton.jit
def attend(q_ptr, k_ptr, v_ptr, o_ptr, tile_ptr, qo_ptr, seq_ptr, ext_ptr, req_ptr, r2t_ptr, num_tiles,
           stride_qt, stride_qh, stride_ks, stride_kh, stride_ot, stride_oh, stride_r2t, qk_scale, split,
           GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
           D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Programs (tile, KV head): the tile's splits one after the other, merged as they come."""
    kv_head = tl.program_id(1)
    token, head, row_ok, seen, table, end = _tile(tile_ptr, qo_ptr, seq_ptr, ext_ptr, req_ptr, r2t_ptr,
                                                  num_tiles, tl.program_id(0), kv_head, stride_r2t, GROUP,
                                                  GROUP_PAD, BLOCK_T)
    d = tl.arange(0, D_PAD)
    mask = row_ok[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=mask, other=0.0)
    top, total, acc = _start(BLOCK_T * GROUP_PAD, D_PAD)
    for start in range(0, end, split):
        s_top, s_total, s_acc = _split(q, k_ptr, v_ptr, table, seen, start, tl.minimum(start + split, end),
                                       kv_head, stride_ks, stride_kh, qk_scale, BLOCK_T * GROUP_PAD, D, D_PAD,
                                       BLOCK_N)
        top, total, acc = _merge(top, total, acc, s_top, s_total, s_acc)
    tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def attend_splits(q_ptr, k_ptr, v_ptr, tops_ptr, totals_ptr, accs_ptr, tile_ptr, qo_ptr, seq_ptr, ext_ptr,
                  req_ptr, r2t_ptr, num_tiles, num_heads, stride_qt, stride_qh, stride_ks, stride_kh,
                  stride_r2t, stride_split, qk_scale, split, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Programs (tile, KV head, part): splits part, part + parts, ... of the tile, each into the workspace:
    tops / totals [splits, T, Hq], accs [splits, T, Hq, D_PAD], row (token, head) at token * Hq + head."""
    kv_head = tl.program_id(1)
    token, head, row_ok, seen, table, end = _tile(tile_ptr, qo_ptr, seq_ptr, ext_ptr, req_ptr, r2t_ptr,
                                                  num_tiles, tl.program_id(0), kv_head, stride_r2t, GROUP,
                                                  GROUP_PAD, BLOCK_T)
    d = tl.arange(0, D_PAD)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
    row = token * num_heads + head
    for start in range(tl.program_id(2) * split, end, tl.num_programs(2) * split):
        s_top, s_total, s_acc = _split(q, k_ptr, v_ptr, table, seen, start, tl.minimum(start + split, end),
                                       kv_head, stride_ks, stride_kh, qk_scale, BLOCK_T * GROUP_PAD, D, D_PAD,
                                       BLOCK_N)
        entry = (start // split).to(tl.int64) * stride_split + row
        tl.store(tops_ptr + entry, s_top, mask=row_ok)
        tl.store(totals_ptr + entry, s_total, mask=row_ok)
        tl.store(accs_ptr + entry[:, None] * D_PAD + d[None, :], s_acc, mask=row_ok[:, None])


@triton.jit
def merge_splits(o_ptr, tops_ptr, totals_ptr, accs_ptr, tile_ptr, qo_ptr, seq_ptr, ext_ptr, req_ptr, r2t_ptr,
                 num_tiles, num_heads, stride_ot, stride_oh, stride_r2t, stride_split, split, GROUP: tl.constexpr,
                 GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """Programs (tile, KV head): attend_splits' splits of the tile merged in split order, into the output."""
    kv_head = tl.program_id(1)
    token, head, row_ok, seen, table, end = _tile(tile_ptr, qo_ptr, seq_ptr, ext_ptr, req_ptr, r2t_ptr,
                                                  num_tiles, tl.program_id(0), kv_head, stride_r2t, GROUP,
                                                  GROUP_PAD, BLOCK_T)
    d = tl.arange(0, D_PAD)
    row = token * num_heads + head
    top, total, acc = _start(BLOCK_T * GROUP_PAD, D_PAD)
    for start in range(0, end, split):
        entry = (start // split).to(tl.int64) * stride_split + row
        s_top = tl.load(tops_ptr + entry, mask=row_ok, other=-1.0e30)
        s_total = tl.load(totals_ptr + entry, mask=row_ok, other=0.0)
        s_acc = tl.load(accs_ptr + entry[:, None] * D_PAD + d[None, :], mask=row_ok[:, None], other=0.0)
        top, total, acc = _merge(top, total, acc, s_top, s_total, s_acc)
    tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < D)[None, :])
