/* Driver of the XNOR-popcount kernels: runtime dispatch, tiling, threads; the portable kernels.
 *
 * Python loads this library with ctypes (bnn_adapt/deploy/packed_kernels.py) and
 * passes tensor data pointers; nothing here knows about torch. Threads come from
 * OpenMP when the library was built with it: loaded after torch, whose libgomp
 * has the same soname, the kernels run on torch's own thread team.
 */
#include <math.h>
#include <string.h>

#include "bitconv.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define BNN_ABI_VERSION 2

static const bnn_isa ISAS[] = {
    {"portable", 4, 1, bnn_tile_portable, bnn_pack_portable},
#ifdef BNN_X86
    {"avx2", 4, 1, bnn_tile_avx2, bnn_pack_avx2},
    {"avx512", 6, 4, bnn_tile_avx512, bnn_pack_avx512},
#endif
};

static int current_isa = -1;

int bnn_abi_version(void) { return BNN_ABI_VERSION; }

int bnn_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* whether this CPU (and OS) runs the kernels of `isa` */
int bnn_isa_supported(int isa)
{
    if (isa == BNN_ISA_PORTABLE)
        return 1;
#ifdef BNN_X86
    __builtin_cpu_init();
    if (isa == BNN_ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    if (isa == BNN_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("fma");
#endif
    return 0;
}

int bnn_best_isa(void)
{
    for (int isa = BNN_ISA_AVX512; isa > BNN_ISA_PORTABLE; isa--)
        if (isa < (int)(sizeof ISAS / sizeof ISAS[0]) && bnn_isa_supported(isa))
            return isa;
    return BNN_ISA_PORTABLE;
}

int bnn_get_isa(void)
{
    if (current_isa < 0)
        current_isa = bnn_best_isa();
    return current_isa;
}

/* force a dispatch level (tests, benchmarks); -1 if this CPU or build lacks it */
int bnn_set_isa(int isa)
{
    if (isa < 0 || isa >= (int)(sizeof ISAS / sizeof ISAS[0]) || !bnn_isa_supported(isa))
        return -1;
    current_isa = isa;
    return 0;
}

const char *bnn_isa_name(int isa)
{
    return isa >= 0 && isa < (int)(sizeof ISAS / sizeof ISAS[0]) ? ISAS[isa].name : "";
}

static int threads(int requested)
{
    return requested > 0 ? requested : 1;
}

/* float [n][c][h][w] at strides (sn, sc, sh, sw) elements (NCHW, NHWC, ...) -> packed signs
 * [n][h + 2 pad][w + 2 pad][cw] (the border stays as it is: 0) */
int bnn_pack_signs(const float *x, int n, int c, int h, int w, long sn, long sc, long sh, long sw, const float *bias,
                   uint32_t *out, int pad, int cw, int nthreads)
{
    if (cw * 32 < c)
        return -1;
    const bnn_isa *isa = &ISAS[bnn_get_isa()];
    const long rows = (long)n * h;
    const int wp = w + 2 * pad, hp = h + 2 * pad;
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads(nthreads)) if (rows * w * c > 32768)
#endif
    for (long r = 0; r < rows; r++) {
        const long img = r / h, y = r % h;
        isa->pack(x + img * sn + y * sh, w, c, sw, sc, bias, out + ((img * hp + y + pad) * wp + pad) * cw, cw);
    }
    return 0;
}

static void make_tile(const bnn_conv_args *a, long p0, int np, int mb, bnn_tile *t)
{
    const long hw = (long)a->out_h * a->out_w;
    const int hp = a->in_h + 2 * a->in_pad, wp = a->in_w + 2 * a->in_pad;
    const int shift = a->in_pad - a->pad;
    const uint64_t all = a->kh * a->kw == 64 ? ~0ULL : (1ULL << (a->kh * a->kw)) - 1;
    t->np = np;
    for (int i = 0; i < mb; i++) {
        const long p = p0 + (i < np ? i : 0);
        const long img = p / hw, r = p % hw;
        const int y = (int)(r / a->out_w) * a->stride - a->pad, x = (int)(r % a->out_w) * a->stride - a->pad;
        t->px[i] = a->in + ((img * hp + y + a->pad + shift) * wp + x + a->pad + shift) * a->cw;
        t->pix[i] = p;
        if (y >= 0 && x >= 0 && y + a->kh <= a->in_h && x + a->kw <= a->in_w) {
            t->valid[i] = all;
            continue;
        }
        uint64_t cols = 0, valid = 0;
        for (int kx = 0; kx < a->kw; kx++)
            if (x + kx >= 0 && x + kx < a->in_w)
                cols |= 1ULL << kx;
        for (int ky = 0; ky < a->kh; ky++)
            if (y + ky >= 0 && y + ky < a->in_h)
                valid |= cols << (ky * a->kw);
        t->valid[i] = valid;
    }
}

/* the binary conv: packed input -> float NHWC or packed signs, per the epilogue flags */
static int conv2d(const bnn_conv_args *a, int nthreads)
{
    if (a->kh * a->kw > BNN_MAX_TAPS || a->pad > a->in_pad || a->cw * 32 < a->c_in || a->n <= 0)
        return -1;
    const bnn_isa *isa = &ISAS[bnn_get_isa()];
    const int cob = (a->c_out + BNN_LANES - 1) / BNN_LANES;
    const int mb = isa->tile_pixels;
    const int groups = (cob + isa->max_blocks - 1) / isa->max_blocks;
    const long pixels = (long)a->n * a->out_h * a->out_w;
    const long tiles = (pixels + mb - 1) / mb;
    const int nt = threads(nthreads);
    /* a chunk of tiles reuses one group's weights; every thread gets a few chunks */
    long per_chunk = tiles / (4L * nt);
    per_chunk = per_chunk < 1 ? 1 : per_chunk > 8 ? 8 : per_chunk;
    const long chunks = (tiles + per_chunk - 1) / per_chunk;
    const long items = chunks * groups;
    const long work = pixels * cob * a->kh * a->kw * a->cw;
    (void)work;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && items > 1 && work > 4096)
#endif
    for (long it = 0; it < items; it++) {
        const long chunk = it / groups;
        const int g = (int)(it % groups);
        const int cb0 = g * cob / groups, cb1 = (g + 1) * cob / groups;
        const long last = (chunk + 1) * per_chunk < tiles ? (chunk + 1) * per_chunk : tiles;
        bnn_tile t;
        for (long tile = chunk * per_chunk; tile < last; tile++) {
            const long p0 = tile * mb;
            const int np = pixels - p0 < mb ? (int)(pixels - p0) : mb;
            make_tile(a, p0, np, mb, &t);
            isa->tile(a, &t, cb0, cb1 - cb0);
        }
    }
    return 0;
}

/* `layer`: a layer and its epilogue (fixed between calls); the rest: this call's tensors */
int bnn_conv2d(const bnn_conv_args *layer, const uint32_t *in, int n, int in_h, int in_w, int in_pad,
               const float *residual, const long *res_strides, float *out, uint16_t *out_bits, int out_pad,
               int out_cw, int nthreads)
{
    bnn_conv_args a = *layer;
    a.in = in;
    a.n = n;
    a.in_h = in_h;
    a.in_w = in_w;
    a.in_pad = in_pad;
    a.out_h = (in_h + 2 * a.pad - a.kh) / a.stride + 1;
    a.out_w = (in_w + 2 * a.pad - a.kw) / a.stride + 1;
    a.residual = residual;
    if (residual) {
        a.res_sn = res_strides[0];
        a.res_sc = res_strides[1];
        a.res_sh = res_strides[2];
        a.res_sw = res_strides[3];
    }
    a.out = out;
    a.out_bits = out_bits;
    a.out_pad = out_pad;
    a.out_cw = out_cw;
    if (a.out_h <= 0 || a.out_w <= 0 || ((a.flags & BNN_RESIDUAL) && !residual) ||
        ((a.flags & BNN_OUT_BITS) ? !out_bits || out_cw * 32 < a.c_out : !out))
        return -1;
    return conv2d(&a, nthreads);
}

/* ------------------------------------------------------------------ portable kernels */

static inline float clamp1(float v) { return v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v; }

static void epilogue_scalar(const bnn_conv_args *a, long pix, int cb, const int32_t *dot)
{
    const int c0 = cb * BNN_LANES;
    const int nl = a->c_out - c0 < BNN_LANES ? a->c_out - c0 : BNN_LANES;
    if (a->flags & BNN_OUT_BITS) {
        const long hw = (long)a->out_h * a->out_w, img = pix / hw, r = pix % hw;
        const int q = a->out_pad, y = (int)(r / a->out_w), x = (int)(r % a->out_w);
        unsigned m = 0;
        for (int l = 0; l < nl; l++)
            m |= (unsigned)(a->lo[c0 + l] <= dot[l] && dot[l] <= a->hi[c0 + l]) << l;
        a->out_bits[((img * (a->out_h + 2 * q) + y + q) * (a->out_w + 2 * q) + x + q) * 2 * a->out_cw + cb] =
            (uint16_t)m;
        return;
    }
    float *o = a->out + pix * a->c_out + c0;
    const float *res = a->residual ? a->residual + bnn_residual_offset(a, pix) + c0 * a->res_sc : NULL;
    for (int l = 0; l < nl; l++) {
        const int c = c0 + l;
        float v = (float)dot[l];
        if (a->flags & BNN_SCALE)
            v = v * a->scale[c];
        if (a->flags & BNN_AFFINE)
            v = fmaf(v, a->alpha[c], a->beta[c]);
        if (a->flags & BNN_CLAMP_BEFORE)
            v = clamp1(v);
        if (a->flags & BNN_RESIDUAL)
            v = v + res[l * a->res_sc];
        if (a->flags & BNN_CLAMP_AFTER)
            v = clamp1(v);
        if (a->flags & BNN_REACT) {
            v = v + a->bias1[c];
            v = v > 0.0f ? v : a->slope[c] * v;
            v = v + a->bias2[c];
        }
        o[l] = v;
    }
}

void bnn_tile_portable(const bnn_conv_args *a, const bnn_tile *t, int cb0, int ncb)
{
    const int taps = a->kh * a->kw, row = (a->in_w + 2 * a->in_pad) * a->cw, kwcw = a->kw * a->cw;
    const uint64_t all = taps == 64 ? ~0ULL : (1ULL << taps) - 1;
    for (int i = 0; i < t->np; i++) {
        for (int cb = cb0; cb < cb0 + ncb; cb++) {
            const uint32_t *wb = a->weights + (size_t)cb * taps * a->cw * BNN_LANES;
            int32_t acc[BNN_LANES] = {0}, dot[BNN_LANES];
            for (int ky = 0; ky < a->kh; ky++) {
                const uint32_t *in = t->px[i] + (size_t)ky * row;
                const uint32_t *w = wb + (size_t)ky * kwcw * BNN_LANES;
                for (int k = 0; k < kwcw; k++)
                    for (int l = 0; l < BNN_LANES; l++)
                        acc[l] += __builtin_popcount(in[k] ^ w[k * BNN_LANES + l]);
            }
            if (t->valid[i] == all) {
                for (int l = 0; l < BNN_LANES; l++)
                    dot[l] = taps * a->c_in - 2 * acc[l];
            } else {
                bnn_border_base(a, t->valid[i], cb, dot);
                for (int l = 0; l < BNN_LANES; l++)
                    dot[l] -= 2 * acc[l];
            }
            epilogue_scalar(a, t->pix[i], cb, dot);
        }
    }
}

void bnn_pack_portable(const float *x, int pixels, int c, long sw, long sc, const float *bias, uint32_t *dst, int cw)
{
    bnn_pack_scalar(x, pixels, c, sw, sc, bias, dst, cw);
}
