/* CPU kernels of difflab's fused GroupNorm -> affine -> SiLU -> dropout node, float32.
 *
 * The node (difflab/networks/fused_native.py) computes, per sample b and channel c,
 *   z = a[b,c] x + o[b,c],   y = m silu(z)   (or y = m z),   m = dropout multiplier,
 * where a and o fold the group statistics, the norm's affine and the time conditioning.
 * Its backward needs gz = dL/dz = gy m silu'(z), then dx = A gz + B x + C per (b, c).
 * Two passes each way:
 *   forward: per-channel sums of x and x^2, then y;
 *   backward: gz (written into dx's buffer) with its per-channel sums of gz and gz x, then
 *   dx in place.
 * z, m and silu'(z) are not stored by the forward: the backward recomputes them from x
 * and the dropout seed, which costs less than writing them and reading them back.
 *
 * Layouts: [B, C, P] (P = H W pixels), either channels-last (element (b, c, p) at offset
 * (b P + p) C + c) or contiguous (at (b C + c) P + p).
 *
 * Dropout: the element at offset i is kept iff the top 16 bits of mix(i * K + seed) are
 * >= thresh, so it is dropped with probability thresh / 2^16. mix is a 32-bit integer
 * finaliser (two xorshift-multiply rounds, Wellons' "lowbias32" constants) and K the
 * odd 32-bit golden-ratio constant: SplitMix's counter-based construction (Steele et al.
 * 2014) at 32 bits, with a seed drawn from PyTorch's generator per call. Backward
 * rebuilds the forward's mask from the seed alone.
 *
 * Threads: OpenMP, linked against the libgomp PyTorch has loaded (same soname), so the
 * kernels share PyTorch's thread pool. Work is split into tasks that do not depend on the
 * thread count, so results are the same for any number of threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define INLINE static inline __attribute__((always_inline))
#define BLOCK 64 /* pixels per float32 partial sum; partials are added in float64 */

/* ---- scalar building blocks (branch-free, so the loops vectorise) ------------------ */

INLINE uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* dropout multiplier of the element at offset i: 0 or scale */
INLINE float keep(uint32_t i, uint32_t seed, uint32_t thresh, float scale) {
    return (mix32(i * 0x9e3779b9U + seed) >> 16) >= thresh ? scale : 0.0f;
}

INLINE float bits_float(int32_t i) { float f; memcpy(&f, &i, 4); return f; }
INLINE int32_t float_bits(float f) { int32_t i; memcpy(&i, &f, 4); return i; }

/* exp(x), x clamped to [-87, 88] (a NaN passes the clamp and the result is NaN-free
 * garbage, which the callers multiply by z, itself NaN). x = n ln2 + r with |r| <= ln2/2;
 * e^r by its Taylor series to degree 7 (truncation error < 6e-9 relative); 2^n written
 * into the exponent bits. ln2 is split in two so that n ln2 is exact to float32. */
INLINE float exp_f(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float round = 12582912.0f; /* 1.5 * 2^23: t + round rounds t to an integer */
    float t = x * 1.44269504088896341f + round;
    float n = t - round;
    int32_t ni = float_bits(t) - float_bits(round);
    float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * (r * r) + r + 1.0f;
    return p * bits_float((ni + 127) << 23);
}

INLINE float sigmoid_f(float z) { return 1.0f / (1.0f + exp_f(-z)); }

INLINE float act(float z, int silu) { return silu ? z * sigmoid_f(z) : z; }

/* dL/dz from g = dL/dy * m: silu'(z) = s (1 + z (1 - s)), s = sigmoid(z) */
INLINE float grad_z(float g, float z, int silu) {
    if (!silu) return g;
    float s = sigmoid_f(z);
    return g * s * (1.0f + z * (1.0f - s));
}

/* ---- tasks ----------------------------------------------------------------------------
 * A task is sample b and rows [r0, r1) of its `rows` rows (P pixel rows channels-last,
 * C channel rows contiguous); `split` tasks per sample. */
#define TASK_BOUNDS                                                                       \
    int64_t b = task / split, chunk = (rows + split - 1) / split;                         \
    int64_t r0 = (task % split) * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;

/* ---- per-channel sums -------------------------------------------------------------------
 * (u, v) = (x, x) for the statistics (GRAD 0) or (gz, x) for the backward (GRAD 1):
 * sum_p u and sum_p u v per (b, c). */

/* channels-last: pixel rows [r0, r1) of sample b into acc[2][C] */
INLINE void sums_cl(const float *gy, const float *x, const float *a, const float *o,
                    float *gz, int64_t C, int64_t P, int64_t b, int64_t r0, int64_t r1,
                    double *acc, int grad, int silu, int masked, uint32_t seed,
                    uint32_t thresh, float scale) {
    float su[C], sv[C];
    const float *ab = a + b * C, *ob = o + b * C;
    for (int64_t c = 0; c < 2 * C; c++) acc[c] = 0.0;
    for (int64_t q0 = r0; q0 < r1; q0 += BLOCK) {
        int64_t q1 = q0 + BLOCK < r1 ? q0 + BLOCK : r1;
        for (int64_t c = 0; c < C; c++) su[c] = sv[c] = 0.0f;
        for (int64_t p = q0; p < q1; p++) {
            int64_t base = (b * P + p) * C;
            const float *xr = x + base, *gr = gy + base;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float u = xr[c];
                if (grad) {
                    u = gr[c];
                    if (masked) u *= keep((uint32_t)(base + c), seed, thresh, scale);
                    u = grad_z(u, ab[c] * xr[c] + ob[c], silu);
                    gz[base + c] = u;
                }
                su[c] += u;
                sv[c] += u * xr[c];
            }
        }
        for (int64_t c = 0; c < C; c++) {
            acc[c] += su[c];
            acc[C + c] += sv[c];
        }
    }
}

/* contiguous: channels [r0, r1) of sample b into out[2][B][C] */
INLINE void sums_nc(const float *gy, const float *x, const float *a, const float *o,
                    float *gz, int64_t B, int64_t C, int64_t P, int64_t b, int64_t r0,
                    int64_t r1, double *out, int grad, int silu, int masked, uint32_t seed,
                    uint32_t thresh, float scale) {
    for (int64_t c = r0; c < r1; c++) {
        int64_t row = b * C + c;
        const float *xr = x + row * P, *gr = gy + row * P;
        float aa = grad ? a[row] : 0.0f, oo = grad ? o[row] : 0.0f;
        double tu = 0.0, tv = 0.0;
        for (int64_t q0 = 0; q0 < P; q0 += BLOCK) {
            int64_t q1 = q0 + BLOCK < P ? q0 + BLOCK : P;
            float su = 0.0f, sv = 0.0f;
#pragma omp simd reduction(+ : su, sv)
            for (int64_t p = q0; p < q1; p++) {
                float u = xr[p];
                if (grad) {
                    u = gr[p];
                    if (masked) u *= keep((uint32_t)(row * P + p), seed, thresh, scale);
                    u = grad_z(u, aa * xr[p] + oo, silu);
                    gz[row * P + p] = u;
                }
                su += u;
                sv += u * xr[p];
            }
            tu += su;
            tv += sv;
        }
        out[row] = tu;
        out[B * C + row] = tv;
    }
}

/* out[2][B][C] (float64); channels-last tasks write partial sums into part[task][2][C].
 * With GRAD, gz is also written out (for the input-gradient pass). */
#define DEFINE_SUMS(NAME, CL, GRAD, SILU, MASKED)                                         \
    static void NAME(const float *gy, const float *x, const float *a, const float *o,      \
                     float *gz, int64_t B, int64_t C, int64_t P, uint32_t seed,            \
                     uint32_t thresh, float scale, int64_t split, double *part,            \
                     double *out, int nt) {                                                \
        int64_t rows = CL ? P : C;                                                         \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                       \
        for (int64_t task = 0; task < B * split; task++) {                                 \
            TASK_BOUNDS                                                                    \
            if (CL)                                                                        \
                sums_cl(gy, x, a, o, gz, C, P, b, r0, r1, part + task * 2 * C, GRAD, SILU, \
                        MASKED, seed, thresh, scale);                                      \
            else                                                                           \
                sums_nc(gy, x, a, o, gz, B, C, P, b, r0, r1, out, GRAD, SILU, MASKED,      \
                        seed, thresh, scale);                                              \
        }                                                                                  \
        if (CL) reduce_split(part, out, B, C, split);                                      \
    }

static void reduce_split(const double *part, double *out, int64_t B, int64_t C,
                         int64_t split) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t k = 0; k < 2; k++)
            for (int64_t c = 0; c < C; c++) {
                double t = 0.0;
                for (int64_t s = 0; s < split; s++) t += part[((b * split + s) * 2 + k) * C + c];
                out[(k * B + b) * C + c] = t;
            }
}

/* ---- elementwise passes ------------------------------------------------------------- */

/* y = m act(a x + o) over rows [r0, r1) of sample b */
INLINE void forward_rows(const float *x, const float *a, const float *o, float *y, int64_t C,
                         int64_t P, int64_t b, int64_t r0, int64_t r1, int cl, int silu,
                         int masked, uint32_t seed, uint32_t thresh, float scale) {
    const float *ab = a + b * C, *ob = o + b * C;
    for (int64_t r = r0; r < r1; r++) {
        int64_t len = cl ? C : P, base = cl ? (b * P + r) * C : (b * C + r) * P;
        const float *xr = x + base;
        float *yr = y + base;
        float aa = cl ? 0.0f : ab[r], oo = cl ? 0.0f : ob[r];
#pragma omp simd
        for (int64_t j = 0; j < len; j++) {
            float v = act((cl ? ab[j] : aa) * xr[j] + (cl ? ob[j] : oo), silu);
            yr[j] = masked ? v * keep((uint32_t)(base + j), seed, thresh, scale) : v;
        }
    }
}

/* g = A g + Bx x + Cx in place over rows [r0, r1) of sample b: g holds gz, then dx */
INLINE void grad_input_rows(const float *x, const float *ca, const float *cb,
                            const float *cc, float *g, int64_t C, int64_t P, int64_t b,
                            int64_t r0, int64_t r1, int cl) {
    int64_t k = b * C;
    const float *A = ca + k, *Bx = cb + k, *Cx = cc + k;
    for (int64_t r = r0; r < r1; r++) {
        int64_t len = cl ? C : P, base = cl ? (b * P + r) * C : (b * C + r) * P;
        const float *xr = x + base;
        float *gr = g + base;
        float A1 = cl ? 0.0f : A[r], B1 = cl ? 0.0f : Bx[r], C1 = cl ? 0.0f : Cx[r];
#pragma omp simd
        for (int64_t j = 0; j < len; j++)
            gr[j] = (cl ? A[j] : A1) * gr[j] + (cl ? Bx[j] : B1) * xr[j] + (cl ? Cx[j] : C1);
    }
}

/* Each (layout, SiLU, mask) combination is its own function, so that the compiler sees
 * the flags as constants inside OpenMP's outlined loop body. */
#define DEFINE_FORWARD(NAME, CL, SILU, MASKED)                                            \
    static void NAME(const float *x, const float *a, const float *o, float *y, int64_t B,  \
                     int64_t C, int64_t P, uint32_t seed, uint32_t thresh, float scale,    \
                     int64_t split, int nt) {                                              \
        int64_t rows = CL ? P : C;                                                         \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                       \
        for (int64_t task = 0; task < B * split; task++) {                                 \
            TASK_BOUNDS                                                                    \
            forward_rows(x, a, o, y, C, P, b, r0, r1, CL, SILU, MASKED, seed, thresh,      \
                         scale);                                                           \
        }                                                                                  \
    }

#define DEFINE_GRAD_INPUT(NAME, CL)                                                       \
    static void NAME(const float *x, const float *ca, const float *cb, const float *cc,    \
                     float *g, int64_t B, int64_t C, int64_t P, int64_t split, int nt) {   \
        int64_t rows = CL ? P : C;                                                         \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                       \
        for (int64_t task = 0; task < B * split; task++) {                                 \
            TASK_BOUNDS                                                                    \
            grad_input_rows(x, ca, cb, cc, g, C, P, b, r0, r1, CL);                        \
        }                                                                                  \
    }

#define DEFINE_GRAD_SUMS(NAME, CL, SILU, MASKED) DEFINE_SUMS(NAME, CL, 1, SILU, MASKED)

#define FOR_EACH_VARIANT(DEF, PREFIX)                                                     \
    DEF(PREFIX##_cl_silu_mask, 1, 1, 1) DEF(PREFIX##_cl_silu, 1, 1, 0)                    \
    DEF(PREFIX##_cl_mask, 1, 0, 1) DEF(PREFIX##_cl, 1, 0, 0)                              \
    DEF(PREFIX##_nc_silu_mask, 0, 1, 1) DEF(PREFIX##_nc_silu, 0, 1, 0)                    \
    DEF(PREFIX##_nc_mask, 0, 0, 1) DEF(PREFIX##_nc, 0, 0, 0)

FOR_EACH_VARIANT(DEFINE_FORWARD, fwd)
DEFINE_GRAD_INPUT(gin_cl, 1)
DEFINE_GRAD_INPUT(gin_nc, 0)
FOR_EACH_VARIANT(DEFINE_GRAD_SUMS, gsum)
DEFINE_SUMS(stats_cl, 1, 0, 0, 0)
DEFINE_SUMS(stats_nc, 0, 0, 0, 0)

#define PICK(PREFIX, CL, SILU, MASKED)                                                    \
    (CL ? (SILU ? (MASKED ? PREFIX##_cl_silu_mask : PREFIX##_cl_silu)                     \
                : (MASKED ? PREFIX##_cl_mask : PREFIX##_cl))                              \
        : (SILU ? (MASKED ? PREFIX##_nc_silu_mask : PREFIX##_nc_silu)                     \
                : (MASKED ? PREFIX##_nc_mask : PREFIX##_nc)))

/* ---- per-(sample, channel) algebra ----------------------------------------------------
 * Notation of difflab/networks/group_norm_grads.py: xhat = (x - mean) rstd,
 * z = k xhat + off with k = gamma (1 + scale) and off = beta (1 + scale) + shift. */

/* mean[b][c], rstd[b][c] of the group of channel c: var = E[x^2] - mean^2 over the group's
 * channels and pixels, rstd = 1 / sqrt(var + eps) */
static int moments(const float *x, int64_t B, int64_t C, int64_t P, int cl, int64_t G,
                   double eps, int64_t split, float *mean, float *rstd, int nt) {
    double *sums = malloc(sizeof(double) * 2 * B * C);
    double *part = cl ? malloc(sizeof(double) * 2 * B * split * C) : NULL;
    if (!sums || (cl && !part)) { free(sums); free(part); return -1; }
    (cl ? stats_cl : stats_nc)(x, x, x, x, NULL, B, C, P, 0, 0, 0.0f, split, part, sums, nt);
    int64_t cg = C / G;
    double n = (double)(cg * P);
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < G; g++) {
            double s = 0.0, q = 0.0;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                s += sums[b * C + c];
                q += sums[(B + b) * C + c];
            }
            double mu = s / n, var = q / n - mu * mu;
            float r = (float)(1.0 / sqrt((var > 0.0 ? var : 0.0) + eps));
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                mean[b * C + c] = (float)mu;
                rstd[b * C + c] = r;
            }
        }
    free(sums);
    free(part);
    return 0;
}

/* optional [B, C] conditioning tensor with strides (s0, s1); absent: `none` */
typedef struct { const float *p; int64_t s0, s1; } cond_t;

INLINE double cond_at(cond_t t, int64_t b, int64_t c, double none) {
    return t.p ? (double)t.p[b * t.s0 + c * t.s1] : none;
}

/* ---- entry points (ctypes) --------------------------------------------------------------
 * They return 0, or -1 if scratch memory could not be allocated. stats is [4][B][C]:
 * a and o (z = a x + o), then the group mean and rstd of each channel; the forward writes
 * it and the backward reads it. */

int gn_act_forward(const float *x, const float *weight, const float *bias,
                   const float *scale, int64_t sc0, int64_t sc1, const float *shift,
                   int64_t sh0, int64_t sh1, int64_t B, int64_t C, int64_t P, int cl,
                   int64_t G, double eps, int silu, int masked, uint32_t seed,
                   uint32_t thresh, float keep_scale, int64_t split, float *stats, float *y,
                   int nt) {
    float *a = stats, *o = stats + B * C, *mean = stats + 2 * B * C, *rstd = stats + 3 * B * C;
    if (moments(x, B, C, P, cl, G, eps, split, mean, rstd, nt)) return -1;
    cond_t sc = {scale, sc0, sc1}, sh = {shift, sh0, sh1};
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++) {
            int64_t i = b * C + c;
            double one_s = cond_at(sc, b, c, 0.0) + 1.0; /* absent scale: factor 1 */
            double k = weight[c] * one_s, off = bias[c] * one_s + cond_at(sh, b, c, 0.0);
            a[i] = (float)(k * rstd[i]);
            o[i] = (float)(off - (double)a[i] * mean[i]);
        }
    PICK(fwd, cl, silu, masked)(x, a, o, y, B, C, P, seed, thresh, keep_scale, split, nt);
    return 0;
}

/* Gradients from gy = dL/dy. With s0 = sum_hw gz, t = sum_hw gz xhat and the group means
 * m1 = mean_G(k s0) / P, m2 = mean_G(k t) / P (means over the group's channels):
 *   dx = rstd (k gz - m1 - xhat m2) = A gz + Bx x + Cx,
 *   dgamma = sum_b t (1 + scale), dbeta = sum_b s0 (1 + scale),
 *   dscale = gamma t + beta s0, dshift = s0.
 * dscale and dshift ([B][C]) are written when not NULL. */
int gn_act_backward(const float *gy, const float *x, const float *stats, const float *weight,
                    const float *bias, const float *scale, int64_t sc0, int64_t sc1,
                    int64_t B, int64_t C, int64_t P, int cl, int64_t G, int silu, int masked,
                    uint32_t seed, uint32_t thresh, float keep_scale, int64_t split, float *dx,
                    float *dweight, float *dbias, float *dscale, float *dshift, int nt) {
    const float *a = stats, *o = stats + B * C, *mean = stats + 2 * B * C;
    const float *rstd = stats + 3 * B * C;
    double *sums = malloc(sizeof(double) * 2 * B * C);
    double *part = cl ? malloc(sizeof(double) * 2 * B * split * C) : NULL;
    float *coef = malloc(sizeof(float) * 3 * B * C);
    double *pg = calloc(2 * C, sizeof(double)); /* dgamma, dbeta */
    if (!sums || (cl && !part) || !coef || !pg) {
        free(sums); free(part); free(coef); free(pg);
        return -1;
    }
    /* dx first holds gz */
    PICK(gsum, cl, silu, masked)(gy, x, a, o, dx, B, C, P, seed, thresh, keep_scale, split,
                                 part, sums, nt);
    cond_t sc = {scale, sc0, sc1};
    int64_t cg = C / G;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < G; g++) {
            double m1 = 0.0, m2 = 0.0;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                int64_t i = b * C + c;
                double one_s = cond_at(sc, b, c, 0.0) + 1.0, k = weight[c] * one_s;
                double s0 = sums[i], t = rstd[i] * (sums[B * C + i] - mean[i] * s0);
                m1 += k * s0;
                m2 += k * t;
                pg[c] += t * one_s;
                pg[C + c] += s0 * one_s;
                if (dscale) dscale[i] = (float)(weight[c] * t + bias[c] * s0);
                if (dshift) dshift[i] = (float)s0;
            }
            m1 /= (double)(cg * P);
            m2 /= (double)(cg * P);
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                int64_t i = b * C + c;
                double r = rstd[i], k = weight[c] * (cond_at(sc, b, c, 0.0) + 1.0);
                coef[i] = (float)(r * k);
                coef[B * C + i] = (float)(-r * r * m2);
                coef[2 * B * C + i] = (float)(r * (mean[i] * r * m2 - m1));
            }
        }
    (cl ? gin_cl : gin_nc)(x, coef, coef + B * C, coef + 2 * B * C, dx, B, C, P, split, nt);
    for (int64_t c = 0; c < C; c++) {
        dweight[c] = (float)pg[c];
        dbias[c] = (float)pg[C + c];
    }
    free(sums);
    free(part);
    free(coef);
    free(pg);
    return 0;
}

/* out[i] = dropout multiplier of offset i, i < n: the mask gn_forward applies */
int gn_dropout_mask(float *out, int64_t n, uint32_t seed, uint32_t thresh, float scale,
                    int nt) {
    int64_t tasks = (n + 65535) / 65536;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t i1 = (t + 1) * 65536 < n ? (t + 1) * 65536 : n;
#pragma omp simd
        for (int64_t i = t * 65536; i < i1; i++) out[i] = keep((uint32_t)i, seed, thresh, scale);
    }
    return 0;
}
