/* bfloat16 kernels of the CPU worker for CPUs with AVX512-BF16 (built and loaded by cpu_kernels.py); quantized
 * linear layers on several rows also use AVX512-VNNI where the CPU has it (built in where __AVX512VNNI__).
 *
 * Linear layers: weights are repacked once into blocks of NB output columns, pairs of input columns
 * interleaved: packed[block][k / 2][column][k % 2]. A block is read as one contiguous stream; one VDPBF16PS
 * multiplies a pair of x's elements (broadcast) by W's elements at those k for 16 output columns, accumulating
 * into float32 lanes that are the output columns themselves (no horizontal sums). The result is rounded to
 * bfloat16 once, after the bias is added in float32, as oneDNN's bf16 F.linear does.
 * Also: residual add + RMSNorm, SiLU(gate) * up, rotary + KV store, and attention over the paged KV cache.
 * Threads: OpenMP, whose runtime is the libgomp.so.1 torch has loaded (the same pool and settings as torch's).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define NB 32 /* output columns per block: two 16-lane float32 accumulators */
#define MB 8  /* rows of x per tile: 16 accumulators */

/* 16 bf16 values as float32 lanes. */
static inline __m512 widen(__m256i bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

/* Up to 16 bf16 values as float32 lanes (masked-off lanes are 0 and not read). */
static inline __m512 load_f32(const uint16_t *p, __mmask16 mask) {
    return widen(_mm256_maskz_loadu_epi16(mask, p));
}

/* A mask of the first `left` of 16 lanes (none for left <= 0). */
static inline __mmask16 lanes(long left) {
    return left <= 0 ? 0 : left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
}

/* w [n_dim, k_dim] (contiguous) -> packed [ceil(n_dim / NB)][ceil(k_dim / 2)][NB][2], zero padded. */
void rs_pack_bf16(const uint16_t *w, long n_dim, long k_dim, uint16_t *packed) {
    long k2_dim = (k_dim + 1) / 2, blocks = (n_dim + NB - 1) / NB;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b++)
        for (long k2 = 0; k2 < k2_dim; k2++)
            for (long j = 0; j < NB; j++)
                for (long e = 0; e < 2; e++) {
                    long n = b * NB + j, k = 2 * k2 + e;
                    packed[((b * k2_dim + k2) * NB + j) * 2 + e] = (n < n_dim && k < k_dim) ? w[n * k_dim + k] : 0;
                }
}

/* acc[i][g] += the pair of columns 2 k2, 2 k2 + 1 of x's row i times w_g's pairs, for rows i < m. */
static inline __attribute__((always_inline)) void dot_pair(const int m, const uint16_t *x, long ldx, long k2,
                                                           __m512bh w0, __m512bh w1, __m512 acc[][2]) {
    for (int i = 0; i < m; i++) {
        int32_t pair;
        memcpy(&pair, x + i * ldx + 2 * k2, 4);
        __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, xb);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, xb);
    }
}

/* y's rows i < m, the columns of groups g0 .. g0 + ng - 1 (16 each) below cols (of NB) = bf16(acc[i][g - g0] + bias),
 * rounded once. */
static inline __attribute__((always_inline)) void store_groups(const int m, const int g0, const int ng,
                                                               __m512 acc[][2], const uint16_t *bias, long cols,
                                                               uint16_t *y, long ldy) {
    for (int g = g0; g < g0 + ng; g++) {
        __mmask16 mask = lanes(cols - 16 * g);
        __m512 b = bias ? load_f32(bias + 16 * g, mask) : _mm512_setzero_ps();
        for (int i = 0; i < m; i++)
            _mm256_mask_storeu_epi16(y + i * ldy + 16 * g, mask,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[i][g - g0], b)));
    }
}

/* y's rows i < m, columns < cols (of NB) = bf16(acc[i] + bias), rounded once. */
static inline __attribute__((always_inline)) void store_tile(const int m, __m512 acc[][2], const uint16_t *bias,
                                                             long cols, uint16_t *y, long ldy) {
    store_groups(m, 0, 2, acc, bias, cols, y, ldy);
}

static inline __attribute__((always_inline)) void tile(const int m, const uint16_t *x, long ldx, const uint16_t *wb,
                                                       long k_dim, const uint16_t *bias, long cols, uint16_t *y,
                                                       long ldy) {
    __m512 acc[MB][2];
    for (int i = 0; i < m; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    long k2_full = k_dim / 2;
    for (long k2 = 0; k2 < k2_full; k2++)
        dot_pair(m, x, ldx, k2, (__m512bh)_mm512_loadu_si512(wb + k2 * 2 * NB),
                 (__m512bh)_mm512_loadu_si512(wb + k2 * 2 * NB + 32), acc);
    if (k_dim & 1) { /* the last column pairs with W's zero padding; x's element past the row is not read */
        long k2 = k2_full;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + k2 * 2 * NB);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb + k2 * 2 * NB + 32);
        for (int i = 0; i < m; i++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int32_t)x[i * ldx + 2 * k2]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, xb);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, xb);
        }
    }
    store_tile(m, acc, bias, cols, y, ldy);
}

/* y[:m_dim, :n_dim] = x W^T (+ bias) for x [m_dim, k_dim] (row stride ldx), y with row stride ldy. */
void rs_linear_bf16(const uint16_t *x, long ldx, long m_dim, const uint16_t *packed, long n_dim, long k_dim,
                    const uint16_t *bias, uint16_t *y, long ldy) {
    long k2_dim = (k_dim + 1) / 2, blocks = (n_dim + NB - 1) / NB, m_blocks = (m_dim + MB - 1) / MB;
#pragma omp parallel for collapse(2) schedule(static)
    for (long b = 0; b < blocks; b++)
        for (long mb = 0; mb < m_blocks; mb++) {
            long n0 = b * NB, i0 = mb * MB, cols = n_dim - n0 < NB ? n_dim - n0 : NB;
            int m = m_dim - i0 < MB ? (int)(m_dim - i0) : MB;
            const uint16_t *wb = packed + b * k2_dim * 2 * NB, *bb = bias ? bias + n0 : 0;
            const uint16_t *xi = x + i0 * ldx;
            uint16_t *yi = y + i0 * ldy + n0;
            switch (m) {
                case 1: tile(1, xi, ldx, wb, k_dim, bb, cols, yi, ldy); break;
                case 2: tile(2, xi, ldx, wb, k_dim, bb, cols, yi, ldy); break;
                case 3: tile(3, xi, ldx, wb, k_dim, bb, cols, yi, ldy); break;
                case 4: tile(4, xi, ldx, wb, k_dim, bb, cols, yi, ldy); break;
                case 5: tile(5, xi, ldx, wb, k_dim, bb, cols, yi, ldy); break;
                case 6: tile(6, xi, ldx, wb, k_dim, bb, cols, yi, ldy); break;
                case 7: tile(7, xi, ldx, wb, k_dim, bb, cols, yi, ldy); break;
                default: tile(8, xi, ldx, wb, k_dim, bb, cols, yi, ldy); break;
            }
        }
}

/* out = bf16(bf16(h * rsqrt(mean(h^2) + eps)) * weight) with h = x, or with residual: h = res_out = bf16(x + res),
 * for rows x [rows, n] (row strides ldx, ldr; out and res_out contiguous): HF's RMSNorm and its rounding steps. */
void rs_add_rmsnorm_bf16(const uint16_t *x, long ldx, const uint16_t *res, long ldr, const uint16_t *weight, long rows,
                         long n, float eps, uint16_t *out, uint16_t *res_out) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (long r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * ldx;
        uint16_t *hr = res ? res_out + r * n : 0;
        __m512 sq = _mm512_setzero_ps();
        for (long c = 0; c < n; c += 16) {
            __mmask16 mask = lanes(n - c);
            __m512 h = load_f32(xr + c, mask);
            if (res) {
                __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(h, load_f32(res + r * ldr + c, mask)));
                _mm256_mask_storeu_epi16(hr + c, mask, rounded);
                h = widen(rounded); /* the rounded sum (masked-off lanes stay 0) */
            }
            sq = _mm512_fmadd_ps(h, h, sq);
        }
        __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)n + eps));
        const uint16_t *hs = res ? hr : xr;
        for (long c = 0; c < n; c += 16) {
            __mmask16 mask = lanes(n - c);
            __m512 normed = widen((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(load_f32(hs + c, mask), inv)));
            __m512 y = _mm512_mul_ps(normed, load_f32(weight + c, mask));
            _mm256_mask_storeu_epi16(out + r * n + c, mask, (__m256i)_mm512_cvtneps_pbh(y));
        }
    }
}

/* e^x in float32 lanes to about 1 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n). */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* r[0..15] (16 dwords each) transposed in place: lane j of r[i] <- lane i of r[j]. */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

/* Rows of one request per attention task: their queries share each key's load and transpose. */
#define ATT_ROWS 4
/* Queries per pass of the P V product (8 float32 accumulators of 16 dims). */
#define ATT_PV 8

/* Elements 0-15 and 16-31 of a vector interleaved: e, 16 + e for e = 0 .. 15. */
static const uint16_t INTERLEAVE16[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* acc[i] = sum over keys j < len of p[i][j] V_j's 16 dims at d, for n <= ATT_PV queries; p [n][ld] in bf16 (0 from
 * len up to an even count), two keys a VDPBF16PS: V_j's and V_j+1's dims interleaved, times (p_j, p_j+1). */
static inline __attribute__((always_inline)) void pv_pass(const int n, const uint16_t *p, long ld, long len,
                                                          const uint16_t *v_cache, const int32_t *slots, long hkv,
                                                          long h, long dim, long d, int fetch, __m512 acc[]) {
    const __m512i interleave = _mm512_loadu_si512(INTERLEAVE16);
    for (int i = 0; i < n; i++) acc[i] = _mm512_setzero_ps();
    for (long j = 0; j < len; j += 2) {
        for (long f = j + 8; fetch && f < j + 10 && f < len; f++)
            _mm_prefetch((const char *)(v_cache + ((long)slots[f] * hkv + h) * dim), _MM_HINT_T0);
        __m256i a = _mm256_loadu_si256((const __m256i *)(v_cache + ((long)slots[j] * hkv + h) * dim + d));
        __m256i b = j + 1 < len
                        ? _mm256_loadu_si256((const __m256i *)(v_cache + ((long)slots[j + 1] * hkv + h) * dim + d))
                        : _mm256_setzero_si256();
        __m512bh vv = (__m512bh)_mm512_permutexvar_epi16(interleave,
                                                          _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
        for (int i = 0; i < n; i++) {
            int32_t pair;
            memcpy(&pair, p + i * ld + j, 4);
            acc[i] = _mm512_dpbf16_ps(acc[i], vv, (__m512bh)_mm512_set1_epi32(pair));
        }
    }
}

/* Attention over the paged KV cache, one query token per row: row t attends to the first lens[t] slots of its
 * request's row of req_to_token, req_to_token[req_slots[t], :lens[t]] (a decode row: the whole context; a
 * prefill or verify row: the causal prefix up to its own token). out[t, h] = softmax(scale * q[t, h] K^T) V with
 * kv head h / (hq / hkv). q and out [rows, hq, dim] contiguous, caches [slots, hkv, dim]; dim % 16 == 0,
 * dim <= 256, hq / hkv <= 16. Slots are the scheduler's (not bound-checked here).
 * A task: up to ATT_ROWS consecutive rows of one request and one kv head (its queries: those rows' query heads
 * of that kv head). Scores 16 keys at a time: the keys' bf16 pairs transposed to one key per lane, then
 * VDPBF16PS per pair of dims, q's pair broadcast (products exact, float32 sums), times the scale; softmax in
 * float32; P V as HF's bf16 attention computes it, P rounded to bf16 (before its sum divides, here after) and the
 * products summed in float32, by VDPBF16PS over pairs of keys; the output rounded to bf16 once. */
void rs_paged_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                             const int32_t *req_to_token, long rtt_stride, const int32_t *req_slots,
                             const int32_t *seq_lens, long batch, long hq, long hkv, long dim, float scale,
                             uint16_t *out) {
    const long group = hq / hkv, pairs = dim / 2;
    long *starts = malloc(sizeof(long) * (batch + 1)), runs = 0;
    if (!starts) abort(); /* out of memory: stop the worker loudly rather than return garbage */
    for (long t = 0; t < batch; t++)
        if (t == 0 || req_slots[t] != req_slots[t - 1] || t - starts[runs - 1] == ATT_ROWS) starts[runs++] = t;
    starts[runs] = batch;
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (long r = 0; r < runs; r++)
        for (long h = 0; h < hkv; h++) {
            const long t0 = starts[r], rows = starts[r + 1] - t0, nq = rows * group;
            const int32_t *slots = req_to_token + (long)req_slots[t0] * rtt_stride;
            long most = 0;
            for (long t = t0; t < t0 + rows; t++) most = seq_lens[t] > most ? seq_lens[t] : most;
            const long ld = most > 32 ? (most + 31) / 32 * 32 : 32; /* p's row: float32, then bf16 in place */
            float *p = malloc(sizeof(float) * nq * ld);
            if (!p) abort();
            /* query i: row t0 + i / group, head h * group + i % group; its q and out at QUERY(i) */
#define QUERY(i) ((((t0 + (i) / group) * hq) + h * group + (i) % group) * dim)
            for (long j0 = 0; j0 < most; j0 += 16) {
                const long keys = most - j0 < 16 ? most - j0 : 16;
                for (long c = 0; c < pairs; c += 16) {
                    const __mmask16 in_chunk = lanes(pairs - c);
                    __m512i kt[16];
                    for (long j = 0; j < 16; j++) {
                        const uint16_t *kr = k_cache + ((long)slots[j0 + (j < keys ? j : 0)] * hkv + h) * dim;
                        /* the next 16 keys' rows and these keys' values, every line of each: a cold cache
                         * (the step's weights pass through it between layers) else serves them one miss at a
                         * time */
                        for (long line = 0; c == 0 && line < 2 * dim; line += 64) {
                            if (j0 + 16 + j < most)
                                _mm_prefetch((const char *)(k_cache + ((long)slots[j0 + 16 + j] * hkv + h) * dim) +
                                                 line, _MM_HINT_T0);
                            if (j < keys)
                                _mm_prefetch((const char *)(v_cache + ((long)slots[j0 + j] * hkv + h) * dim) + line,
                                             _MM_HINT_T1);
                        }
                        kt[j] = j < keys ? _mm512_maskz_loadu_epi32(in_chunk, kr + 2 * c) : _mm512_setzero_si512();
                    }
                    transpose16(kt); /* kt[e]: pair c + e of each key, key j in lane j */
                    const long e_dim = pairs - c < 16 ? pairs - c : 16;
                    for (long i = 0; i < nq; i++) {
                        const int32_t *qp = (const int32_t *)(q + QUERY(i)) + c;
                        __m512 s0 = c ? _mm512_loadu_ps(p + i * ld + j0) : _mm512_setzero_ps();
                        __m512 s1 = _mm512_setzero_ps();
                        for (long e = 0; e + 1 < e_dim; e += 2) {
                            s0 = _mm512_dpbf16_ps(s0, (__m512bh)kt[e], (__m512bh)_mm512_set1_epi32(qp[e]));
                            s1 = _mm512_dpbf16_ps(s1, (__m512bh)kt[e + 1], (__m512bh)_mm512_set1_epi32(qp[e + 1]));
                        }
                        if (e_dim & 1)
                            s0 = _mm512_dpbf16_ps(s0, (__m512bh)kt[e_dim - 1],
                                                  (__m512bh)_mm512_set1_epi32(qp[e_dim - 1]));
                        _mm512_storeu_ps(p + i * ld + j0, _mm512_add_ps(s0, s1));
                    }
                }
            }
            float *sum = malloc(sizeof(float) * nq);
            if (!sum) abort();
            for (long i = 0; i < nq; i++) { /* p[i][j] = e^(scale (s_j - max)) for j < len, 0 up to ld */
                const long len = seq_lens[t0 + i / group];
                float *row = p + i * ld;
                __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
                for (long j = 0; j < len; j += 16)
                    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, lanes(len - j), row + j));
                const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top)), sv = _mm512_set1_ps(scale);
                for (long j = 0; j < ld; j += 16) {
                    __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift), sv);
                    __m512 e = _mm512_maskz_mov_ps(lanes(len - j), exp_ps(x));
                    _mm512_storeu_ps(row + j, e);
                    total = _mm512_add_ps(total, e);
                }
                sum[i] = _mm512_reduce_add_ps(total);
                for (long j = 0; j < ld; j += 32) /* bf16 at element j of the row's own start: behind what is read */
                    _mm512_storeu_si512((uint16_t *)row + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + j + 16),
                                                                                        _mm512_loadu_ps(row + j)));
            }
            for (long d = 0; d < dim; d += 16)
                for (long i0 = 0; i0 < nq; i0 += ATT_PV) {
                    const int n = nq - i0 < ATT_PV ? (int)(nq - i0) : ATT_PV, fetch = d == 0 && i0 == 0;
                    __m512 acc[ATT_PV];
                    const uint16_t *pb = (const uint16_t *)p + i0 * 2 * ld; /* rows of 2 ld bf16, ld used */
#define PV(N) pv_pass(N, pb, 2 * ld, most, v_cache, slots, hkv, h, dim, d, fetch, acc)
                    switch (n) {
                        case 1: PV(1); break;
                        case 2: PV(2); break;
                        case 3: PV(3); break;
                        case 4: PV(4); break;
                        case 5: PV(5); break;
                        case 6: PV(6); break;
                        case 7: PV(7); break;
                        default: PV(8); break;
                    }
#undef PV
                    for (int k = 0; k < n; k++) {
                        const long i = i0 + k;
                        __m512 inv = _mm512_set1_ps(sum[i] > 0.0f ? 1.0f / sum[i] : 0.0f);
                        _mm256_storeu_si256((__m256i *)(out + QUERY(i) + d),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[k], inv)));
                    }
                }
#undef QUERY
            free(sum), free(p);
        }
    free(starts);
}

/* out[r] = the index of the greatest of row r of x [rows, n] (row stride ld) as torch.argmax picks it: the first
 * of equal greatest values, and a NaN above every number (its first NaN). One pass for the greatest value, a
 * second for where it first is (it stops there). */
void rs_argmax_f32(const float *x, long ld, long rows, long n, int64_t *out) {
#pragma omp parallel for schedule(static) if (rows > 1)
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * ld;
        __m512 top = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (long j = 0; j < n; j += 16) {
            __m512 v = _mm512_mask_loadu_ps(top, lanes(n - j), row + j);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            top = _mm512_max_ps(top, v);
        }
        const float greatest = _mm512_reduce_max_ps(top);
        long at = 0;
        for (long j = 0; j < n; j += 16) {
            __m512 v = _mm512_maskz_loadu_ps(lanes(n - j), row + j);
            __mmask16 hit = lanes(n - j) & (nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)
                                                : _mm512_cmp_ps_mask(v, _mm512_set1_ps(greatest), _CMP_EQ_OQ));
            if (hit) {
                at = j + __builtin_ctz(hit);
                break;
            }
        }
        out[r] = at;
    }
}

/* out[r] = bf16(bf16(silu(gate)) * up) for x[r] = gate | up ([rows, 2n], row stride ldx; out [rows, n]). */
void rs_silu_and_mul_bf16(const uint16_t *x, long ldx, long rows, long n, uint16_t *out) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (long r = 0; r < rows; r++)
        for (long c = 0; c < n; c += 16) {
            __mmask16 mask = lanes(n - c);
            __m512 gate = load_f32(x + r * ldx + c, mask);
            __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate)));
            __m512 act = _mm512_div_ps(gate, denominator);
            __m512 act_bf16 = widen((__m256i)_mm512_cvtneps_pbh(act));
            __m512 y = _mm512_mul_ps(act_bf16, load_f32(x + r * ldx + n + c, mask));
            _mm256_mask_storeu_epi16(out + r * n + c, mask, (__m256i)_mm512_cvtneps_pbh(y));
        }
}

/* Rotate-half RoPE of q and k, then the KV store, for tokens t < tokens: qk [t, q_heads + kv_heads, dim] (strides
 * ldt, ldh), v [t, kv_heads, dim] (strides ldvt, ldvh), cos / sin [t, dim / 2] (row stride ldc). The rotated q goes
 * to q_out [tokens, q_heads, dim]; the rotated k and v to k_cache / v_cache [slots, kv_heads, dim] at slots[t].
 * Each rotated element is computed in float32 and rounded to bf16 once. dim is even. */
void rs_rotary_store_bf16(const uint16_t *qk, long ldt, long ldh, const uint16_t *v, long ldvt, long ldvh,
                          const uint16_t *cos, const uint16_t *sin, long ldc, const int64_t *slots, long tokens,
                          long q_heads, long kv_heads, long dim, uint16_t *q_out, uint16_t *k_cache,
                          uint16_t *v_cache) {
    const long half = dim / 2;
#pragma omp parallel for schedule(static) if (tokens > 8)
    for (long t = 0; t < tokens; t++) {
        for (long h = 0; h < q_heads + kv_heads; h++) {
            const uint16_t *x = qk + t * ldt + h * ldh;
            uint16_t *dst = h < q_heads ? q_out + (t * q_heads + h) * dim
                                        : k_cache + (slots[t] * kv_heads + h - q_heads) * dim;
            for (long c = 0; c < half; c += 16) {
                __mmask16 mask = lanes(half - c);
                __m512 x1 = load_f32(x + c, mask), x2 = load_f32(x + half + c, mask);
                __m512 co = load_f32(cos + t * ldc + c, mask), si = load_f32(sin + t * ldc + c, mask);
                __m512 r1 = _mm512_fmsub_ps(x1, co, _mm512_mul_ps(x2, si));
                __m512 r2 = _mm512_fmadd_ps(x2, co, _mm512_mul_ps(x1, si));
                _mm256_mask_storeu_epi16(dst + c, mask, (__m256i)_mm512_cvtneps_pbh(r1));
                _mm256_mask_storeu_epi16(dst + half + c, mask, (__m256i)_mm512_cvtneps_pbh(r2));
            }
        }
        for (long h = 0; h < kv_heads; h++)
            memcpy(v_cache + (slots[t] * kv_heads + h) * dim, v + t * ldvt + h * ldvh, dim * sizeof(uint16_t));
    }
}

/* Quantized linear layers (cpu_quant.py) with x in bf16 (one row; several too where built without AVX512-VNNI,
 * else linear_q8 below): weight w[n][k] = scale[n][k / bk] * code[n][k] + offset[n][k / bk], codes of 4 or 8 bits
 * kept in memory as they are and unpacked in registers to bf16, which holds them exactly, so that VDPBF16PS
 * multiplies them by x's bf16 pairs with float32 sums: the result is x times the dequantized weight up to float32
 * summation order. Per block of bk columns of k, the float32 sum of code * x is scaled, and the
 * offset times the block's sum of x added.
 * Layout (cpu_quant.pack), per block of NB output columns and pair of k, like rs_pack_bf16's [k / 2][NB][2]:
 *   8 bits: 64 signed bytes [NB][2];
 *   4 bits: 32 bytes, byte e = lo | hi << 4 with lo the code of (column e / 2, k e % 2) and hi that of column
 *           16 + e / 2; unpacked as the bf16 number 128 + code (bits 0x4300 | code), so the kernel adds
 *           (offset - 128 scale) times the block's sum of x;
 *   scales, offsets: [blocks][k / bk][NB], float32, or fp16 (`half`: GGUF's own, exact in fp16). */
static inline __attribute__((always_inline)) void unpack_codes(const int bits, const uint8_t *p, __m512bh *w0,
                                                               __m512bh *w1) {
    if (bits == 16) { /* unpacked before (rs_linear_quant with several row tiles) */
        *w0 = (__m512bh)_mm512_loadu_si512(p);
        *w1 = (__m512bh)_mm512_loadu_si512(p + 64);
    } else if (bits == 4) {
        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
        __m512i nibble = _mm512_set1_epi16(0x000f), bias = _mm512_set1_epi16(0x4300);
        *w0 = (__m512bh)_mm512_ternarylogic_epi32(v, nibble, bias, 0xea); /* (v & nibble) | bias */
        *w1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nibble, bias, 0xea);
    } else {
        __m512 lo[2], hi[2];
        for (int g = 0; g < 2; g++) {
            lo[g] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 32 * g))));
            hi[g] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 32 * g + 16))));
        }
        *w0 = _mm512_cvtne2ps_pbh(hi[0], lo[0]); /* bf16 elements 0..15 from lo, 16..31 from hi */
        *w1 = _mm512_cvtne2ps_pbh(hi[1], lo[1]);
    }
}

/* 16 scales or offsets from element i of p (float32, or fp16 where half). */
static inline __m512 load_scales(const void *p, long i, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)))
                : _mm512_loadu_ps((const float *)p + i);
}

/* Rows of x per quantized tile: with one block of k (per-channel scales) 8 (16 accumulators); with several
 * blocks 4 (8 accumulators of the block's sums, 8 of the scaled total: 5 or 6 rows spill registers). */
/* Bytes ahead of the codes being read that a tile asks for (a prefetch per 64-byte line): the hardware
 * prefetcher alone left one row's 4-bit tile at about 2/3 of the memory bandwidth. */
#define PF_DIST 4096
#define QMB_ONE 8
#define QMB_BLOCKS 4

/* What a tile needs besides its rows: the quantized layer's column block and the rows' sums of x per block. */
typedef struct {
    const uint8_t *codes;
    const void *scale, *offset; /* offset may be NULL */
    const float *xsum;          /* [rows][k / bk], where biased or offset */
    long k_dim, bk, half, biased; /* biased: codes unpacked as 128 + code (4 bits) */
    const char *next;             /* where unpacked before (bits 16): the next column block's codes, to prefetch */
    long next_pair_bytes;
} qblock;

static inline __attribute__((always_inline)) void qtile(const int m, const int bits, const int one_block,
                                                        const qblock *q, const uint16_t *x, long ldx,
                                                        const uint16_t *bias, long cols, uint16_t *y, long ldy) {
    const long pair_bytes = bits * NB * 2 / 8, kb_dim = q->k_dim / q->bk, bk = q->bk;
    __m512 acc[QMB_ONE][2];
    for (int i = 0; i < m; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long kb = 0; kb < kb_dim; kb++) {
        __m512 part[QMB_ONE][2];
        for (int i = 0; i < m; i++) part[i][0] = part[i][1] = _mm512_setzero_ps();
        for (long k2 = kb * bk / 2; k2 < (kb + 1) * bk / 2; k2++) {
            __m512bh w0, w1;
            if (bits != 16 && (k2 * pair_bytes) % 64 == 0)
                _mm_prefetch((const char *)q->codes + k2 * pair_bytes + PF_DIST, _MM_HINT_T0);
            if (bits == 16 && q->next && (k2 * q->next_pair_bytes) % 64 == 0)
                _mm_prefetch(q->next + k2 * q->next_pair_bytes, _MM_HINT_T1);
            unpack_codes(bits, q->codes + k2 * pair_bytes, &w0, &w1);
            dot_pair(m, x, ldx, k2, w0, w1, part);
        }
        /* acc + part * scale: with one block, acc is 0 and this is part * scale, rounded once */
        __m512 s0 = load_scales(q->scale, kb * NB, q->half), s1 = load_scales(q->scale, kb * NB + 16, q->half);
        for (int i = 0; i < m; i++) {
            acc[i][0] = one_block ? _mm512_mul_ps(part[i][0], s0) : _mm512_fmadd_ps(part[i][0], s0, acc[i][0]);
            acc[i][1] = one_block ? _mm512_mul_ps(part[i][1], s1) : _mm512_fmadd_ps(part[i][1], s1, acc[i][1]);
        }
        if (q->offset || q->biased) {
            __m512 o0 = _mm512_setzero_ps(), o1 = _mm512_setzero_ps();
            if (q->offset)
                o0 = load_scales(q->offset, kb * NB, q->half), o1 = load_scales(q->offset, kb * NB + 16, q->half);
            if (q->biased) { /* codes read as 128 + code: the offset less 128 scales (128 s is exact) */
                o0 = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), s0, o0);
                o1 = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), s1, o1);
            }
            for (int i = 0; i < m; i++) {
                __m512 sx = _mm512_set1_ps(q->xsum[i * kb_dim + kb]);
                acc[i][0] = _mm512_fmadd_ps(o0, sx, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(o1, sx, acc[i][1]);
            }
        }
    }
    store_tile(m, acc, bias, cols, y, ldy);
}

#define QTILE(M, B, ONE) qtile(M, B, ONE, &qb, xi, ldx, bb, cols, yi, ldy)
#define QTILES(B)                                                                                                  \
    if (kb_dim == 1) {                                                                                             \
        switch (m) {                                                                                               \
            case 1: QTILE(1, B, 1); break;                                                                         \
            case 2: QTILE(2, B, 1); break;                                                                         \
            case 3: QTILE(3, B, 1); break;                                                                         \
            case 4: QTILE(4, B, 1); break;                                                                         \
            case 5: QTILE(5, B, 1); break;                                                                         \
            case 6: QTILE(6, B, 1); break;                                                                         \
            case 7: QTILE(7, B, 1); break;                                                                         \
            default: QTILE(8, B, 1); break;                                                                        \
        }                                                                                                          \
    } else {                                                                                                       \
        switch (m) {                                                                                               \
            case 1: QTILE(1, B, 0); break;                                                                         \
            case 2: QTILE(2, B, 0); break;                                                                         \
            case 3: QTILE(3, B, 0); break;                                                                         \
            default: QTILE(4, B, 0); break;                                                                        \
        }                                                                                                          \
    }

/* Quantized layers on several rows, activations quantized too (CPUs with AVX512-VNNI; as llama.cpp's Q8_1 dot
 * products): each row of x is quantized per block of QK = 32 columns to int8, q = round(x / xs) (half to even) with
 * xs = max |x| / 127 (a block of zeros: xs = 0, q = 0), and VPDPBUSD multiplies 4 weight codes (unsigned bytes) by
 * 4 of q (signed) into int32 lanes, exactly. 4-bit codes are 0..15 as they are; 8-bit codes are read as 128 + code
 * (the sign bit flipped), the 128 taken back with the offset: per block of 32 columns of x and output column,
 *     y += scale * xs * dot(code', q) + (offset - 128 scale where 8 bits) * xs * sum(q),
 * so a row computes the dequantized weight times its dequantized x (xs * q) up to float32 summation order: an
 * integer multiply-add takes 4 products an instruction where VDPBF16PS takes 2, and no unpacking to bf16.
 * Weight blocks: bk = 32 (GGUF's), or one per row (int8's per-channel scale: the float32 sums of xs * dot are
 * scaled once at the end). A thread unpacks a block of NB output columns once into `wide`, 4 codes of a column
 * per 32-bit lane as VPDPBUSD reads them ([k / 4][NB][4] bytes), and runs every row tile over it. */
#ifdef __AVX512VNNI__
#define QK 32     /* columns of x per activation block */
#define NEAREST (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) /* half to even, as torch.round */
#define Q8_MB 8      /* most rows per tile (q8tile: both column groups up to 4 rows, one a pass beyond) */
#define Q8_WIDE_MB 4 /* rows per tile over an unpacked column block (both groups a pass: measured faster there) */
#ifndef Q8_ROWS
#define Q8_ROWS 2 /* rs_linear_quant takes this path from this many rows of x */
#endif

/* acc + VPDPBUSD(w unsigned, x's 4 bytes at p signed, broadcast by the instruction's own memory operand), in
 * assembly: GCC 12 copies the accumulator out and back around each _mm512_dpbusd_epi32 of a one-group tile (two
 * moves an instruction, measured slower). */
static inline __attribute__((always_inline)) __m512i dpbusd_at(__m512i acc, __m512i w, const int8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)p));
    return acc;
}

/* Row r of xq [m][k] = q, xs [m][k / QK] = xs and xsq [m][k / bk] = the sum over the blocks of QK within each
 * block of bk of xs * sum(q), for rows x [m][k] bf16 (row stride ldx). */
static void quantize_row(const uint16_t *x, long ldx, long r, long k, long bk, int8_t *xq, float *xs, float *xsq) {
    const long ab_dim = k / QK, kb_dim = k / bk;
    for (long kb = 0; kb < kb_dim; kb++) xsq[r * kb_dim + kb] = 0.0f;
    for (long a = 0; a < ab_dim; a++) {
        const uint16_t *p = x + r * ldx + a * QK;
        __m512 v0 = load_f32(p, 0xffff), v1 = load_f32(p + 16, 0xffff);
        float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127.0f;
        __m512i q0 = _mm512_setzero_si512(), q1 = _mm512_setzero_si512();
        if (d > 0.0f) { /* x / xs (not x * (1 / xs)): the quotient torch's reference rounds */
            __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
            __m512 dv = _mm512_set1_ps(d);
            q0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvt_roundps_epi32(_mm512_div_ps(v0, dv), NEAREST), lo), hi);
            q1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvt_roundps_epi32(_mm512_div_ps(v1, dv), NEAREST), lo), hi);
        }
        _mm_storeu_si128((__m128i *)(xq + r * k + a * QK), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + r * k + a * QK + 16), _mm512_cvtepi32_epi8(q1));
        xs[r * ab_dim + a] = d;
        xsq[r * kb_dim + a * QK / bk] += d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

/* 4 codes of k of each of a column block's NB columns, from rs_pack_quant's layout at `p` (two pairs of k), as
 * VPDPBUSD reads them: w0 for columns 0-15, w1 for 16-31, a column's 4 codes (unsigned bytes) per 32-bit lane.
 * 4 bits: the pairs (32 bytes each) interleave by 16-bit lanes, low nibbles columns 0-15, high 16-31; 8 bits: the
 * pairs (64 bytes each) interleave likewise, the sign bit flipped (code + 128). */
static const uint16_t QUAD_IDX[3][32] = {
    {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15,
     31},
    {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15,
     47},
    {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61,
     30, 62, 31, 63}};

static inline __attribute__((always_inline)) void load_quads(const int bits, const uint8_t *p, const __m512i idx[3],
                                                             __m512i *w0, __m512i *w1) {
    if (bits == 0) { /* unpacked before (linear_q8 with several row tiles) */
        *w0 = _mm512_loadu_si512(p);
        *w1 = _mm512_loadu_si512(p + 64);
    } else if (bits == 4) {
        __m512i v = _mm512_permutexvar_epi16(idx[0], _mm512_loadu_si512(p)), nibble = _mm512_set1_epi8(0x0f);
        *w0 = _mm512_and_si512(v, nibble);
        *w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    } else {
        __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 64), sign = _mm512_set1_epi8(-128);
        *w0 = _mm512_xor_si512(_mm512_permutex2var_epi16(a, idx[1], b), sign);
        *w1 = _mm512_xor_si512(_mm512_permutex2var_epi16(a, idx[2], b), sign);
    }
}

/* The scales and offsets of block kb, 16 columns each (offset less 128 scale where biased). */
static inline __attribute__((always_inline)) void block_terms(const void *scale, const void *offset, long kb,
                                                              long half, int biased, __m512 s[2], __m512 o[2]) {
    for (int g = 0; g < 2; g++) {
        s[g] = load_scales(scale, kb * NB + 16 * g, half);
        o[g] = offset ? load_scales(offset, kb * NB + 16 * g, half) : _mm512_setzero_ps();
        if (biased) o[g] = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), s[g], o[g]);
    }
}

/* Rows [m] of x quantized times a column block's codes (bits 4 or 8), unpacked as they are read with a software
 * prefetch PF_DIST ahead; or (bits 0) unpacked before into [k / 4][NB][4] bytes, fetching the next column block's
 * codes (`next`, of next_quad_bytes per 4 columns of k) as it goes. The tile's columns: groups g0 .. g0 + ng - 1
 * of 16: up to 4 rows both groups at once (16 accumulators); 5-8 rows one group a pass (16 accumulators, the
 * second pass reading the block's codes from L1, where the first left them). */
static inline __attribute__((always_inline)) void q8tile(const int m, const int g0, const int ng, const int bits,
                                                         const int one_block, const uint8_t *codes, const char *next,
                                                         long next_quad_bytes, long k_dim, const int8_t *xq,
                                                         const float *xs, const float *xsq, const void *scale,
                                                         const void *offset, long half, int biased,
                                                         const uint16_t *bias, long cols, uint16_t *y, long ldy) {
    const long ab_dim = k_dim / QK, kb_dim = one_block ? 1 : ab_dim, quad_bytes = bits ? bits * NB * 4 / 8 : 128;
    const __m512i idx[3] = {_mm512_loadu_si512(QUAD_IDX[0]), _mm512_loadu_si512(QUAD_IDX[1]),
                            _mm512_loadu_si512(QUAD_IDX[2])};
    __m512 acc[Q8_MB][2], s[2], o[2];
    for (int i = 0; i < m; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long a = 0; a < ab_dim; a++) {
        __m512i dot[Q8_MB][2];
        for (int i = 0; i < m; i++) dot[i][0] = dot[i][1] = _mm512_setzero_si512();
        for (long k4 = a * QK / 4; k4 < (a + 1) * QK / 4; k4++) {
            __m512i w[2];
            for (long line = 0; bits && g0 == 0 && line < quad_bytes; line += 64)
                _mm_prefetch((const char *)codes + k4 * quad_bytes + line + PF_DIST, _MM_HINT_T0);
            for (long line = 0; next && line < next_quad_bytes; line += 64)
                _mm_prefetch(next + k4 * next_quad_bytes + line, _MM_HINT_T0);
            load_quads(bits, codes + k4 * quad_bytes, idx, &w[0], &w[1]);
            for (int i = 0; i < m; i++) {
                const int8_t *xi = xq + i * k_dim + 4 * k4;
                if (ng == 1) {
                    dot[i][0] = dpbusd_at(dot[i][0], w[g0], xi);
                } else {
                    int32_t quad;
                    memcpy(&quad, xi, 4);
                    const __m512i xb = _mm512_set1_epi32(quad);
                    dot[i][0] = _mm512_dpbusd_epi32(dot[i][0], w[0], xb);
                    dot[i][1] = _mm512_dpbusd_epi32(dot[i][1], w[1], xb);
                }
            }
        }
        if (one_block) {
            for (int i = 0; i < m; i++) {
                __m512 xv = _mm512_set1_ps(xs[i * ab_dim + a]);
                for (int g = 0; g < ng; g++)
                    acc[i][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][g]), xv, acc[i][g]);
            }
        } else {
            block_terms(scale, offset, a, half, biased, s, o);
            for (int i = 0; i < m; i++) {
                __m512 xv = _mm512_set1_ps(xs[i * ab_dim + a]), sq = _mm512_set1_ps(xsq[i * kb_dim + a]);
                for (int g = 0; g < ng; g++) {
                    __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[i][g]), xv);
                    acc[i][g] = _mm512_fmadd_ps(o[g0 + g], sq, _mm512_fmadd_ps(scaled, s[g0 + g], acc[i][g]));
                }
            }
        }
    }
    if (one_block) {
        block_terms(scale, offset, 0, half, biased, s, o);
        for (int i = 0; i < m; i++)
            for (int g = 0; g < ng; g++)
                acc[i][g] = _mm512_fmadd_ps(o[g0 + g], _mm512_set1_ps(xsq[i]), _mm512_mul_ps(acc[i][g], s[g0 + g]));
    }
    store_groups(m, g0, ng, acc, bias, cols, y, ldy);
}

#define Q8TILE(M, G0, NG, B, ONE)                                                                                  \
    q8tile(M, G0, NG, B, ONE, B ? block_codes : wide, B || mb || G0 ? 0 : next, quad_bytes, k_dim,                \
           xq + i0 * k_dim, xs + i0 * ab_dim, xsq + i0 * kb_dim, sb, ob, half, bits == 8, bb, cols,               \
           y + i0 * ldy + n0, ldy)
#define Q8PASSES(M, B, ONE) Q8TILE(M, 0, 1, B, ONE); Q8TILE(M, 1, 1, B, ONE)
#define Q8TILES(B, ONE)                                                                                            \
    switch (m) {                                                                                                   \
        case 1: Q8TILE(1, 0, 2, B, ONE); break;                                                                    \
        case 2: Q8TILE(2, 0, 2, B, ONE); break;                                                                    \
        case 3: Q8TILE(3, 0, 2, B, ONE); break;                                                                    \
        case 4: Q8TILE(4, 0, 2, B, ONE); break;                                                                    \
        case 5: Q8PASSES(5, B, ONE); break;                                                                        \
        case 6: Q8PASSES(6, B, ONE); break;                                                                        \
        case 7: Q8PASSES(7, B, ONE); break;                                                                        \
        default: Q8PASSES(8, B, ONE); break;                                                                       \
    }

/* rs_linear_quant's operands; k_dim a multiple of QK and bk == QK or bk == k_dim. */
static void linear_q8(const uint16_t *x, long ldx, long m_dim, const uint8_t *codes, long bits, const void *scale,
                      const void *offset, long half, long n_dim, long k_dim, long bk, const uint16_t *bias,
                      uint16_t *y, long ldy) {
    const long ab_dim = k_dim / QK, kb_dim = k_dim / bk, scale_bytes = half ? 2 : 4;
    const long tile_rows = m_dim <= Q8_MB ? Q8_MB : Q8_WIDE_MB, m_blocks = (m_dim + tile_rows - 1) / tile_rows;
    const long blocks = (n_dim + NB - 1) / NB, quad_bytes = bits * NB * 4 / 8;
    int8_t *xq = malloc(m_dim * k_dim);
    float *xs = malloc(sizeof(float) * m_dim * ab_dim), *xsq = malloc(sizeof(float) * m_dim * kb_dim);
    if (!xq || !xs || !xsq) abort(); /* out of memory: stop the worker loudly rather than return garbage */
    /* Up to Q8_MB rows, one row tile: each column block's codes are unpacked as they are read. More: a thread
     * unpacks a column block once into `wide` and runs every row tile (Q8_WIDE_MB rows) over it. */
#pragma omp parallel
    {
        uint8_t *wide = m_blocks > 1 ? malloc(k_dim * NB) : 0;
        if (m_blocks > 1 && !wide) abort();
        const __m512i idx[3] = {_mm512_loadu_si512(QUAD_IDX[0]), _mm512_loadu_si512(QUAD_IDX[1]),
                                _mm512_loadu_si512(QUAD_IDX[2])};
#pragma omp for schedule(static) /* its barrier: every row quantized before the tiles read them */
        for (long r = 0; r < m_dim; r++) quantize_row(x, ldx, r, k_dim, bk, xq, xs, xsq);
#pragma omp for schedule(static)
        for (long b = 0; b < blocks; b++) {
            const long n0 = b * NB, cols = n_dim - n0 < NB ? n_dim - n0 : NB;
            const uint8_t *block_codes = codes + b * k_dim * quad_bytes / 4;
            const char *next = b + 1 < blocks ? (const char *)block_codes + k_dim * quad_bytes / 4 : 0;
            const void *sb = (const uint8_t *)scale + b * kb_dim * NB * scale_bytes;
            const void *ob = offset ? (const uint8_t *)offset + b * kb_dim * NB * scale_bytes : 0;
            const uint16_t *bb = bias ? bias + n0 : 0;
            /* this block's scales and offsets, read by every row tile's epilogue: asked for now, they arrive
             * while the codes unpack (else the first tile waits on each line) */
            for (long line = 0; wide && line < kb_dim * NB * scale_bytes; line += 64) {
                _mm_prefetch((const char *)sb + line, _MM_HINT_T0);
                if (ob) _mm_prefetch((const char *)ob + line, _MM_HINT_T0);
            }
            for (long k4 = 0; wide && k4 < k_dim / 4; k4++) {
                __m512i w0, w1;
                for (long line = 0; line < quad_bytes; line += 64)
                    _mm_prefetch((const char *)block_codes + k4 * quad_bytes + line + PF_DIST, _MM_HINT_T0);
                if (bits == 4) load_quads(4, block_codes + k4 * quad_bytes, idx, &w0, &w1);
                else load_quads(8, block_codes + k4 * quad_bytes, idx, &w0, &w1);
                _mm512_storeu_si512(wide + k4 * 128, w0);
                _mm512_storeu_si512(wide + k4 * 128 + 64, w1);
            }
            for (long mb = 0; mb < m_blocks; mb++) {
                const long i0 = mb * tile_rows;
                const int m = m_dim - i0 < tile_rows ? (int)(m_dim - i0) : (int)tile_rows;
                if (wide && kb_dim == 1) {
                    Q8TILES(0, 1)
                } else if (wide) {
                    Q8TILES(0, 0)
                } else if (bits == 4 && kb_dim == 1) {
                    Q8TILES(4, 1)
                } else if (bits == 4) {
                    Q8TILES(4, 0)
                } else if (kb_dim == 1) {
                    Q8TILES(8, 1)
                } else {
                    Q8TILES(8, 0)
                }
            }
        }
        free(wide);
    }
    free(xq), free(xs), free(xsq);
}
#else
#define Q8_ROWS 0 /* built without AVX512-VNNI: rs_linear_quant never takes that path */
#endif

/* The least rows of x from which rs_linear_quant quantizes them (0: never, the CPU lacks AVX512-VNNI). */
long rs_q8_rows(void) { return Q8_ROWS; }

/* y[:m_dim, :n_dim] = x W^T (+ bias) for the quantized W above (bits 4 or 8; offset may be NULL; scale and
 * offset fp16 where half), x [m_dim, k_dim] bf16 with row stride ldx (k_dim a multiple of bk, bk even), y bf16
 * with row stride ldy. From Q8_ROWS rows (built with AVX512-VNNI; k_dim a multiple of QK; bk QK or k_dim): x
 * quantized per row, linear_q8; else x in bf16. */
void rs_linear_quant(const uint16_t *x, long ldx, long m_dim, const uint8_t *codes, long bits, const void *scale,
                     const void *offset, long half, long n_dim, long k_dim, long bk, const uint16_t *bias,
                     uint16_t *y, long ldy) {
#ifdef __AVX512VNNI__
    if (m_dim >= Q8_ROWS && k_dim % QK == 0 && (bk == QK || bk == k_dim)) {
        linear_q8(x, ldx, m_dim, codes, bits, scale, offset, half, n_dim, k_dim, bk, bias, y, ldy);
        return;
    }
#endif
    long kb_dim = k_dim / bk, tile_rows = kb_dim == 1 ? QMB_ONE : QMB_BLOCKS, scale_bytes = half ? 2 : 4;
    long blocks = (n_dim + NB - 1) / NB, m_blocks = (m_dim + tile_rows - 1) / tile_rows;
    const int sums = offset || bits == 4;
    float *xsum = sums ? malloc(sizeof(float) * m_dim * kb_dim) : 0; /* per row and block of k: sum of x */
    if (sums)
        for (long r = 0; r < m_dim; r++)
            for (long kb = 0; kb < kb_dim; kb++) {
                __m512 s = _mm512_setzero_ps();
                for (long c = kb * bk; c < (kb + 1) * bk; c += 16)
                    s = _mm512_add_ps(s, load_f32(x + r * ldx + c, lanes((kb + 1) * bk - c)));
                xsum[r * kb_dim + kb] = _mm512_reduce_add_ps(s);
            }
    /* One row tile: each column block's codes are unpacked as they are read. Several: a thread unpacks a column
     * block once into `wide` (bf16 pairs, as the registers hold them) and runs every row tile over it. */
#pragma omp parallel
    {
        uint8_t *wide = m_blocks > 1 ? malloc(k_dim / 2 * NB * 2 * sizeof(uint16_t)) : 0;
#pragma omp for schedule(static)
        for (long b = 0; b < blocks; b++) {
            long n0 = b * NB, cols = n_dim - n0 < NB ? n_dim - n0 : NB;
            qblock qb = {codes + b * k_dim * NB * bits / 8, (const uint8_t *)scale + b * kb_dim * NB * scale_bytes,
                         offset ? (const uint8_t *)offset + b * kb_dim * NB * scale_bytes : 0, 0, k_dim, bk, half,
                         bits == 4};
            const uint16_t *bb = bias ? bias + n0 : 0;
            if (wide) {
                /* the first row tile fetches the next column block's codes as it goes: the tiles of this block
                 * run from cache while they arrive (else reading them would stall the unpacking) */
                qb.next = b + 1 < blocks ? (const char *)(qb.codes + k_dim * NB * bits / 8) : 0;
                qb.next_pair_bytes = bits * NB * 2 / 8;
                for (long k2 = 0; k2 < k_dim / 2; k2++) {
                    __m512bh w0, w1;
                    if (bits == 4) unpack_codes(4, qb.codes + k2 * NB, &w0, &w1);
                    else unpack_codes(8, qb.codes + k2 * NB * 2, &w0, &w1);
                    _mm512_storeu_si512(wide + k2 * 128, (__m512i)w0);
                    _mm512_storeu_si512(wide + k2 * 128 + 64, (__m512i)w1);
                }
                qb.codes = wide;
            }
            for (long mb = 0; mb < m_blocks; mb++) {
                long i0 = mb * tile_rows;
                int m = m_dim - i0 < tile_rows ? (int)(m_dim - i0) : (int)tile_rows;
                qb.xsum = sums ? xsum + i0 * kb_dim : 0;
                qb.next = mb == 0 ? qb.next : 0;
                const uint16_t *xi = x + i0 * ldx;
                uint16_t *yi = y + i0 * ldy + n0;
                if (wide) {
                    QTILES(16)
                } else if (bits == 4) {
                    QTILES(4)
                } else {
                    QTILES(8)
                }
            }
        }
        free(wide);
    }
    free(xsum);
}

/* A GGUF tensor's rows of blocks of 32 (Q8_0: fp16 d, 32 int8; Q4_0: fp16 d, 16 bytes; Q4_1: fp16 d, fp16 m,
 * 16 bytes; byte j of a 4-bit block holds elements j and j + 16) -> one code per byte (int8, or uint8 0-15),
 * scale[n][k / 32] and, for 4 bits, offset[n][k / 32] (Q4_0: -8 d; Q4_1: m). Row r comes from raw row
 * order[r] (order NULL: row r). */
void rs_gguf_decode(const uint8_t *raw, const int64_t *order, long n, long k, long header, long bits, uint8_t *codes,
                    float *scale, float *offset) {
    const long kb_dim = k / 32, block_bytes = header + 32 * bits / 8;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < n; r++)
        for (long kb = 0; kb < kb_dim; kb++) {
            const uint8_t *blk = raw + ((order ? order[r] : r) * kb_dim + kb) * block_bytes, *qs = blk + header;
            uint16_t h[2];
            memcpy(h, blk, header);
            scale[r * kb_dim + kb] = _cvtsh_ss(h[0]);
            uint8_t *c = codes + r * k + kb * 32;
            if (bits == 8) {
                memcpy(c, qs, 32);
                continue;
            }
            offset[r * kb_dim + kb] = header == 4 ? _cvtsh_ss(h[1]) : -8.0f * _cvtsh_ss(h[0]);
            for (int j = 0; j < 16; j++) c[j] = qs[j] & 15, c[j + 16] = qs[j] >> 4;
        }
}

/* codes [n][k] (one per byte), scale / offset [n][k / bk] float32 (offset may be NULL) -> rs_linear_quant's
 * layout, zero padded to whole blocks of NB columns; out_scale / out_offset fp16 where half (the caller checks
 * that fp16 holds them exactly), else float32. */
void rs_pack_quant(const uint8_t *codes, long n, long k, long bits, const float *scale, const float *offset, long bk,
                   long half, uint8_t *out_codes, void *out_scale, void *out_offset) {
    const long blocks = (n + NB - 1) / NB, kb_dim = k / bk, pair_bytes = bits * NB * 2 / 8;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b++) {
        for (long j = 0; j < NB; j++) {
            long r = b * NB + j;
            for (long kb = 0; kb < kb_dim; kb++) {
                float s = r < n ? scale[r * kb_dim + kb] : 0.0f, o = r < n && offset ? offset[r * kb_dim + kb] : 0.0f;
                long at = (b * kb_dim + kb) * NB + j;
                if (half) {
                    ((uint16_t *)out_scale)[at] = _cvtss_sh(s, 0);
                    if (offset) ((uint16_t *)out_offset)[at] = _cvtss_sh(o, 0);
                } else {
                    ((float *)out_scale)[at] = s;
                    if (offset) ((float *)out_offset)[at] = o;
                }
            }
        }
        uint8_t *dst = out_codes + b * (k / 2) * pair_bytes;
        memset(dst, 0, (k / 2) * pair_bytes);
        for (long j = 0; j < NB && b * NB + j < n; j++)
            for (long kk = 0; kk < k; kk++) {
                uint8_t c = codes[(b * NB + j) * k + kk];
                long k2 = kk / 2, e = (j % 16) * 2 + kk % 2;
                if (bits == 8)
                    dst[k2 * pair_bytes + j * 2 + kk % 2] = c;
                else
                    dst[k2 * pair_bytes + e] |= j < 16 ? c : (uint8_t)(c << 4);
            }
    }
}

/* One linear layer of the decoder stack: bf16 in rs_pack_bf16's layout (bits 16), or quantized codes in
 * rs_pack_quant's (bits 4 or 8, with scale / offset per block of bk columns, fp16 where half); bias may be NULL. */
typedef struct {
    const void *weight, *scale, *offset;
    const uint16_t *bias;
    long bits, n, k, bk, half;
} rs_linear;

/* A Llama-family decoder layer (cpu_stack.py builds these): norms' weights, linears, this layer's KV caches. */
typedef struct {
    const uint16_t *input_norm, *post_norm;
    rs_linear qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache;
} rs_layer;

static void run_linear(const rs_linear *l, const uint16_t *x, long m, uint16_t *y) {
    if (l->bits == 16)
        rs_linear_bf16(x, l->k, m, l->weight, l->n, l->k, l->bias, y, l->n);
    else
        rs_linear_quant(x, l->k, m, l->weight, l->bits, l->scale, l->offset, l->half, l->n, l->k, l->bk, l->bias, y,
                        l->n);
}

/* The whole decoder stack of a step in one call, each layer as LlamaDecoderLayer.forward runs it through the
 * kernels above (the same kernels in the same order, so the same numbers): x [tokens, hidden] the embeddings;
 * out [tokens, hidden] = the final norm of the last hidden state. Rows of attention as rs_paged_attention_bf16's
 * (row_slots, row_lens); slots: each token's KV slot; cos / sin [tokens, dim / 2] (row stride ldc). Returns 0, or
 * -1 where scratch memory could not be had (nothing written to out). */
long rs_decoder_stack(const rs_layer *layers, long n_layers, const uint16_t *x, long tokens, long hidden,
                      long q_heads, long kv_heads, long dim, float eps, float scale, const uint16_t *cos,
                      const uint16_t *sin, long ldc, const int64_t *slots, const int32_t *req_to_token,
                      long rtt_stride, const int32_t *row_slots, const int32_t *row_lens,
                      const uint16_t *final_norm, uint16_t *out) {
    const long qkv_n = (q_heads + 2 * kv_heads) * dim, q_n = q_heads * dim;
    long widest = qkv_n > q_n ? qkv_n : q_n;
    for (long i = 0; i < n_layers; i++)
        widest = layers[i].gate_up.n > widest ? layers[i].gate_up.n : widest;
    /* h: a layer's output; res: the residual stream; normed: a norm's output; wide, q: the layer's scratch */
    uint16_t *h = malloc(sizeof(uint16_t) * tokens * hidden), *res = malloc(sizeof(uint16_t) * tokens * hidden);
    uint16_t *normed = malloc(sizeof(uint16_t) * tokens * hidden), *wide = malloc(sizeof(uint16_t) * tokens * widest);
    uint16_t *q = malloc(sizeof(uint16_t) * tokens * widest), *attn = malloc(sizeof(uint16_t) * tokens * q_n);
    long ok = h && res && normed && wide && q && attn;
    for (long i = 0; ok && i < n_layers; i++) {
        const rs_layer *l = layers + i;
        if (i == 0) {
            rs_add_rmsnorm_bf16(x, hidden, 0, 0, l->input_norm, tokens, hidden, eps, normed, 0);
            memcpy(res, x, sizeof(uint16_t) * tokens * hidden);
        } else {
            rs_add_rmsnorm_bf16(h, hidden, res, hidden, l->input_norm, tokens, hidden, eps, normed, res);
        }
        run_linear(&l->qkv, normed, tokens, wide);
        rs_rotary_store_bf16(wide, qkv_n, dim, wide + (q_heads + kv_heads) * dim, qkv_n, dim, cos, sin, ldc, slots,
                             tokens, q_heads, kv_heads, dim, q, l->k_cache, l->v_cache);
        rs_paged_attention_bf16(q, l->k_cache, l->v_cache, req_to_token, rtt_stride, row_slots, row_lens, tokens,
                                q_heads, kv_heads, dim, scale, attn);
        run_linear(&l->o, attn, tokens, h);
        rs_add_rmsnorm_bf16(h, hidden, res, hidden, l->post_norm, tokens, hidden, eps, normed, res);
        run_linear(&l->gate_up, normed, tokens, wide);
        rs_silu_and_mul_bf16(wide, l->gate_up.n, tokens, l->gate_up.n / 2, q);
        run_linear(&l->down, q, tokens, h);
    }
    if (ok) rs_add_rmsnorm_bf16(h, hidden, res, hidden, final_norm, tokens, hidden, eps, out, res);
    free(h), free(res), free(normed), free(wide), free(q), free(attn);
    return ok ? 0 : -1;
}
