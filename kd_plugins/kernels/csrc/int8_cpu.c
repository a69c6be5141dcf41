/* CPU passes of the W8A8 linear layers (kd_plugins/kernels/cpu_int8.py is the only caller).
 *
 * Each function is one pass over its operand, OpenMP-parallel over rows (the OpenMP runtime is the one torch has
 * already loaded, so torch.set_num_threads applies). Every float operation is the one the eager PyTorch path
 * (kd_plugins/quant/dynamic.py, kd_plugins/quant/_core.py) performs, in the same order, so the results are bit for
 * bit the eager ones: no -ffast-math, no FMA contraction (-ffp-contract=off), rounding half to even (nearbyintf in
 * the default rounding mode, as torch.round). A maximum does not depend on the order it is taken in.
 *
 * All arrays are dense row-major; shapes are passed explicitly. Sizes are int64.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QMAX 127.0f
#define TINY 1e-30f

static inline float fmaxabs(float m, float v) {
    float a = fabsf(v);
    return a > m ? a : m;
}

/* c[j] = max_i |x[i, j]| for x [m, k]: each thread keeps maxima of its rows, then the partial maxima are merged. */
void kd_col_absmax(const float *x, int64_t m, int64_t k, float *c, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (m < 64 * nthreads) nthreads = 1;
    float *part = (float *)calloc((size_t)nthreads * (size_t)k, sizeof(float));
    if (!part) { /* no memory for partials: one thread */
        memset(c, 0, (size_t)k * sizeof(float));
        for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < k; ++j) c[j] = fmaxabs(c[j], x[i * k + j]);
        return;
    }
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        int tid = omp_get_thread_num();
        int nt = omp_get_num_threads();
#else
        int tid = 0, nt = 1;
#endif
        float *p = part + (size_t)tid * (size_t)k;
        int64_t lo = m * tid / nt, hi = m * (tid + 1) / nt;
        for (int64_t i = lo; i < hi; ++i) {
            const float *row = x + i * k;
#pragma omp simd
            for (int64_t j = 0; j < k; ++j) p[j] = fmaxabs(p[j], row[j]);
        }
    }
    memcpy(c, part, (size_t)k * sizeof(float));
    for (int t = 1; t < nthreads; ++t) {
        const float *p = part + (size_t)t * (size_t)k;
        for (int64_t j = 0; j < k; ++j) c[j] = p[j] > c[j] ? p[j] : c[j];
    }
    free(part);
}

/* t[i] = max_j |x[i, j]| * keep[j] (keep: 1 on ordinary columns, 0 on outlier columns; NULL: every column). */
void kd_row_absmax(const float *x, int64_t m, int64_t k, const float *keep, float *t, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m * k > 32768)
    for (int64_t i = 0; i < m; ++i) {
        const float *row = x + i * k;
        float a = 0.0f;
        if (keep) {
#pragma omp simd reduction(max : a)
            for (int64_t j = 0; j < k; ++j) {
                float v = fabsf(row[j]) * keep[j];
                a = v > a ? v : a;
            }
        } else {
#pragma omp simd reduction(max : a)
            for (int64_t j = 0; j < k; ++j) {
                float v = fabsf(row[j]);
                a = v > a ? v : a;
            }
        }
        t[i] = a;
    }
}

/* q[i, j] = round((x[i, j] * inv[j]) * mult[i]) as int8 (inv NULL: round(x[i, j] * mult[i])). No clamp: callers
 * guarantee |codes| <= 127 (per-token and CrossQuant row factors bound every element). */
void kd_quantize_rows(const float *x, int64_t m, int64_t k, const float *inv, const float *mult, int8_t *q,
                      int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m * k > 32768)
    for (int64_t i = 0; i < m; ++i) {
        const float *row = x + i * k;
        int8_t *out = q + i * k;
        const float f = mult[i];
        if (inv) {
#pragma omp simd
            for (int64_t j = 0; j < k; ++j) out[j] = (int8_t)nearbyintf((row[j] * inv[j]) * f);
        } else {
#pragma omp simd
            for (int64_t j = 0; j < k; ++j) out[j] = (int8_t)nearbyintf(row[j] * f);
        }
    }
}

/* Per-output-channel requantization of w [n, k] (int8) times diag(g): v = float(w) * g, mx[r] = max(max_j |v|, TINY),
 * codes round(v * ((1 / mx[r]) * 127)) (torch computes 127 / m as reciprocal(m) * 127). */
void kd_requantize_weight(const int8_t *w, int64_t n, int64_t k, const float *g, int8_t *q, float *mx, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n * k > 32768)
    for (int64_t r = 0; r < n; ++r) {
        const int8_t *row = w + r * k;
        int8_t *out = q + r * k;
        float a = 0.0f;
#pragma omp simd reduction(max : a)
        for (int64_t j = 0; j < k; ++j) {
            float v = fabsf((float)row[j] * g[j]);
            a = v > a ? v : a;
        }
        a = a > TINY ? a : TINY;
        const float f = (1.0f / a) * QMAX;
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) out[j] = (int8_t)nearbyintf(((float)row[j] * g[j]) * f);
        mx[r] = a;
    }
}

/* y[i, c] = (float(acc[i, c]) * rs[i]) * cs[c] (+ bias[c]) (+ sum_o xo[i, o] * wo[o, c]); y has row stride ldy (it
 * may be a slice of a wider output). The optional rank-no term is the float product over the outlier columns of
 * dynamic CrossQuant (xo [m, no], wo [no, n]), rounded as the eager path's addmm_ (MKL sgemm on x86) rounds it: one
 * column is a fused multiply-add into y; several are summed first (a fused multiply-add chain from the first
 * product), then added. */
void kd_scale_int32(const int32_t *acc, int64_t m, int64_t n, const float *rs, const float *cs, const float *bias,
                    const float *xo, const float *wo, int64_t no, float *y, int64_t ldy, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m * n > 32768)
    for (int64_t i = 0; i < m; ++i) {
        const int32_t *a = acc + i * n;
        float *out = y + i * ldy;
        const float f = rs[i];
        if (bias) {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) out[c] = ((float)a[c] * f) * cs[c] + bias[c];
        } else {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) out[c] = ((float)a[c] * f) * cs[c];
        }
        if (no == 1) {
            const float u = xo[i];
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) out[c] = fmaf(u, wo[c], out[c]);
        } else if (no > 1) {
            const float *u = xo + i * no;
            float s[256];
            for (int64_t c0 = 0; c0 < n; c0 += 256) {
                const int64_t len = n - c0 < 256 ? n - c0 : 256;
#pragma omp simd
                for (int64_t c = 0; c < len; ++c) s[c] = u[0] * wo[c0 + c];
                for (int64_t o = 1; o < no; ++o) {
                    const float *w = wo + o * n + c0;
#pragma omp simd
                    for (int64_t c = 0; c < len; ++c) s[c] = fmaf(u[o], w[c], s[c]);
                }
#pragma omp simd
                for (int64_t c = 0; c < len; ++c) out[c0 + c] += s[c];
            }
        }
    }
}
