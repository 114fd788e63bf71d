// CUDA kernels of multilabel-resnet, compiled at run time with NVRTC
// (`cuda/mod.rs`). Activations and their gradients are f32 or bf16 (each
// kernel has an `_bf16` twin); arithmetic is in f32, with f64 accumulation
// for the per-channel sums (as the CPU kernels do); per-channel statistics
// and reductions are f32. One block per channel for reductions.
//
// Layouts: activations are contiguous [N, C, HW]; per-channel results are
// rows of a [rows, C] array.

#define BLOCK 256

// bfloat16 as its bits, so that NVRTC needs no CUDA headers.
typedef unsigned short bf16_t;

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const bf16_t* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
// Round to nearest, ties to even, as candle's (the `half` crate's) f32 →
// bf16 conversion; a NaN stays a (quiet) NaN.
__device__ __forceinline__ void store(bf16_t* p, long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i] = (bf16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}

// Sum of `v` over the block; every thread gets the total.
__device__ double block_sum(double v, double* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int stride = BLOCK / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            shared[threadIdx.x] += shared[threadIdx.x + stride];
        }
        __syncthreads();
    }
    double total = shared[0];
    __syncthreads();
    return total;
}

__device__ __forceinline__ long long at(long long i, int c, int hw, int ch) {
    long long ni = i / hw;
    long long j = i - ni * hw;
    return (ni * c + ch) * hw + j;
}

// Train-mode BatchNorm statistics of channel blockIdx.x, into `stats`
// [5, C]: mean, biased variance, 1/sqrt(var + eps), and the affine that
// normalises: scale = w·inv_std, shift = b − mean·scale. Two passes (mean,
// then the mean square deviation), as the CPU kernel.
template <typename T>
__device__ void bn_stats_impl(
    const T* x, const float* w, const float* b, float* stats,
    int n, int c, int hw, double eps) {
    __shared__ double shared[BLOCK];
    int ch = blockIdx.x;
    long long count = (long long)n * hw;
    double s = 0.0;
    for (long long i = threadIdx.x; i < count; i += BLOCK) {
        s += (double)load(x, at(i, c, hw, ch));
    }
    double mean = block_sum(s, shared) / (double)count;
    float m = (float)mean;
    double q = 0.0;
    for (long long i = threadIdx.x; i < count; i += BLOCK) {
        float d = load(x, at(i, c, hw, ch)) - m;
        q += (double)(d * d);
    }
    double var = block_sum(q, shared) / (double)count;
    if (threadIdx.x == 0) {
        double inv_std = 1.0 / sqrt(var + eps);
        float scale = (float)((double)w[ch] * inv_std);
        float shift = (float)((double)b[ch] - mean * (double)scale);
        stats[ch] = m;
        stats[c + ch] = (float)var;
        stats[2 * c + ch] = (float)inv_std;
        stats[3 * c + ch] = scale;
        stats[4 * c + ch] = shift;
    }
}

// y = x·scale[c] + shift[c] (+ residual, when not null), then ReLU if
// `relu`; scale and shift are rows 3 and 4 of `stats`.
template <typename T>
__device__ void bn_apply_impl(
    const T* x, const float* stats, const T* residual, T* y,
    long long len, int c, int hw, int relu) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % c);
        float v = load(x, i) * stats[3 * c + ch] + stats[4 * c + ch];
        if (residual) {
            v = v + load(residual, i);
        }
        store(y, i, relu && v < 0.0f ? 0.0f : v);
    }
}

// out = g where y > 0, else 0: the ReLU's backward from its output (the
// residual's gradient at the end of a block).
template <typename T>
__device__ void relu_mask_impl(const T* y, const T* g, T* out, long long len) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        store(out, i, load(y, i) > 0.0f ? load(g, i) : 0.0f);
    }
}

// Backward reduction of channel blockIdx.x, into `red` [5, C]: dweight,
// dbias, and the three coefficients of dx = k1·g − k2 − k3·(x − mean).
// With `relu`, the gradient is zero where the output `y` is not positive.
template <typename T>
__device__ void bn_grad_reduce_impl(
    const T* x, const T* y, const T* g, const float* stats,
    const float* w, float* red, int n, int c, int hw, int relu) {
    __shared__ double shared[BLOCK];
    int ch = blockIdx.x;
    long long count = (long long)n * hw;
    float m = stats[ch];
    double sg = 0.0, sgx = 0.0;
    for (long long i = threadIdx.x; i < count; i += BLOCK) {
        long long k = at(i, c, hw, ch);
        float gv = relu && load(y, k) <= 0.0f ? 0.0f : load(g, k);
        sg += (double)gv;
        sgx += (double)(gv * (load(x, k) - m));
    }
    double db = block_sum(sg, shared);
    double sum_gx = block_sum(sgx, shared);
    if (threadIdx.x == 0) {
        double inv_std = (double)stats[2 * c + ch];
        double dw = sum_gx * inv_std;
        double k1 = (double)w[ch] * inv_std;
        red[ch] = (float)dw;
        red[c + ch] = (float)db;
        red[2 * c + ch] = (float)k1;
        red[3 * c + ch] = (float)(k1 * db / (double)count);
        red[4 * c + ch] = (float)(k1 * inv_std * dw / (double)count);
    }
}

// dx = k1·g − k2 − k3·(x − mean), with g masked by the ReLU as above.
template <typename T>
__device__ void bn_grad_input_impl(
    const T* x, const T* y, const T* g, const float* stats,
    const float* red, T* dx, long long len, int c, int hw, int relu) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % c);
        float gv = relu && load(y, i) <= 0.0f ? 0.0f : load(g, i);
        float v = red[2 * c + ch] * gv - red[3 * c + ch]
            - red[4 * c + ch] * (load(x, i) - stats[ch]);
        store(dx, i, v);
    }
}

// The stem's 3×3, stride-2, padding-1 max-pool over planes [planes, h, w]
// (planes = N·C). Like the CPU kernel (`max_pool.rs`): padding never wins,
// the first maximum of a window in row-major order wins, and the first NaN
// wins outright. Every window holds at least its centre row and column.
template <typename T>
__device__ __forceinline__ int pool_arg_max(
    const T* plane, int h, int w, int oy, int ox) {
    int y0 = max(2 * oy - 1, 0), y1 = min(2 * oy + 2, h);
    int x0 = max(2 * ox - 1, 0), x1 = min(2 * ox + 2, w);
    int best_at = y0 * w + x0;
    float best = load(plane, best_at);
    if (best != best) {
        return best_at;
    }
    for (int y = y0; y < y1; ++y) {
        for (int x = x0; x < x1; ++x) {
            float v = load(plane, y * w + x);
            if (v != v) {
                return y * w + x;
            }
            if (v > best) {
                best = v;
                best_at = y * w + x;
            }
        }
    }
    return best_at;
}

// y[p, oy, ox] = the window's maximum, one thread per output value.
template <typename T>
__device__ void max_pool_fwd_impl(
    const T* x, T* y, long long planes, int h, int w, int oh, int ow) {
    long long len = planes * oh * ow;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        long long p = i / ((long long)oh * ow);
        int o = (int)(i - p * oh * ow);
        const T* plane = x + p * h * w;
        y[i] = plane[pool_arg_max(plane, h, w, o / ow, o % ow)];
    }
}

// dx[p, iy, ix] = the sum of g over the outputs whose window's maximum is
// (iy, ix), one thread per input value: at most 2×2 windows cover a value,
// gathered in row-major output order (the CPU kernel's order of
// accumulation), so no atomics and the same sum every run.
template <typename T>
__device__ void max_pool_bwd_impl(
    const T* x, const T* g, T* dx, long long planes, int h, int w,
    int oh, int ow) {
    long long len = planes * h * w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        long long p = i / ((long long)h * w);
        int at = (int)(i - p * h * w);
        int iy = at / w, ix = at % w;
        const T* plane = x + p * h * w;
        const T* gp = g + p * oh * ow;
        // Windows of output o cover inputs 2o − 1 … 2o + 1.
        int oy0 = iy / 2, oy1 = min((iy + 1) / 2, oh - 1);
        int ox0 = ix / 2, ox1 = min((ix + 1) / 2, ow - 1);
        float sum = 0.0f;
        for (int oy = oy0; oy <= oy1; ++oy) {
            for (int ox = ox0; ox <= ox1; ++ox) {
                if (pool_arg_max(plane, h, w, oy, ox) == at) {
                    sum += load(gp, oy * ow + ox);
                }
            }
        }
        store(dx, i, sum);
    }
}

// The entry points: each kernel for f32 (plain name) and for bf16 (`_bf16`).
#define ENTRY_POINTS(T, SUFFIX)                                                     \
    extern "C" __global__ void bn_stats##SUFFIX(                                    \
        const T* x, const float* w, const float* b, float* stats, int n, int c,     \
        int hw, double eps) {                                                       \
        bn_stats_impl(x, w, b, stats, n, c, hw, eps);                               \
    }                                                                               \
    extern "C" __global__ void bn_apply##SUFFIX(                                    \
        const T* x, const float* stats, const T* residual, T* y, long long len,     \
        int c, int hw, int relu) {                                                  \
        bn_apply_impl(x, stats, residual, y, len, c, hw, relu);                     \
    }                                                                               \
    extern "C" __global__ void relu_mask##SUFFIX(                                   \
        const T* y, const T* g, T* out, long long len) {                            \
        relu_mask_impl(y, g, out, len);                                             \
    }                                                                               \
    extern "C" __global__ void bn_grad_reduce##SUFFIX(                              \
        const T* x, const T* y, const T* g, const float* stats, const float* w,     \
        float* red, int n, int c, int hw, int relu) {                               \
        bn_grad_reduce_impl(x, y, g, stats, w, red, n, c, hw, relu);                \
    }                                                                               \
    extern "C" __global__ void bn_grad_input##SUFFIX(                               \
        const T* x, const T* y, const T* g, const float* stats, const float* red,   \
        T* dx, long long len, int c, int hw, int relu) {                            \
        bn_grad_input_impl(x, y, g, stats, red, dx, len, c, hw, relu);              \
    }                                                                               \
    extern "C" __global__ void max_pool_fwd##SUFFIX(                                \
        const T* x, T* y, long long planes, int h, int w, int oh, int ow) {         \
        max_pool_fwd_impl(x, y, planes, h, w, oh, ow);                              \
    }                                                                               \
    extern "C" __global__ void max_pool_bwd##SUFFIX(                                \
        const T* x, const T* g, T* dx, long long planes, int h, int w, int oh,      \
        int ow) {                                                                   \
        max_pool_bwd_impl(x, g, dx, planes, h, w, oh, ow);                          \
    }

ENTRY_POINTS(float, )
ENTRY_POINTS(bf16_t, _bf16)

// BatchNorm's running statistic in place, f32:
// running = running·keep + (batch·factor)·take (factor: 1 for the mean,
// n/(n−1) for the variance), in the composite path's order of operations.
extern "C" __global__ void bn_running(
    float* running, const float* batch, int c, float keep, float take, float factor) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < c; i += gridDim.x * blockDim.x) {
        running[i] = running[i] * keep + (batch[i] * factor) * take;
    }
}

// fastai's concat pool, f32, one thread per plane (n, c) of H·W values:
// y[n, c] = the plane's first maximum in row-major order (its first NaN,
// if any), y[n, C + c] = its values summed in order, times 1/(H·W); the
// backward gives every value 1/(H·W) of the mean's gradient and adds the
// maximum's gradient at the first maximum. The CPU kernel's operations in
// the CPU kernel's order, so the same bits.
__device__ int plane_first_max(const float* p, int hw) {
    int best = 0;
    for (int j = 0; j < hw; ++j) {
        float v = p[j];
        if (v != v) return j;
        if (v > p[best]) best = j;
    }
    return best;
}

extern "C" __global__ void concat_pool_fwd(
    const float* x, float* y, long long planes, int c, int hw, float inv) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < planes;
         i += (long long)gridDim.x * blockDim.x) {
        const float* p = x + i * hw;
        long long n = i / c;
        long long ch = i - n * c;
        float sum = 0.0f;
        for (int j = 0; j < hw; ++j) sum += p[j];
        y[n * 2 * c + ch] = p[plane_first_max(p, hw)];
        y[n * 2 * c + c + ch] = sum * inv;
    }
}

extern "C" __global__ void concat_pool_bwd(
    const float* x, const float* g, float* dx, long long planes, int c, int hw, float inv) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < planes;
         i += (long long)gridDim.x * blockDim.x) {
        const float* p = x + i * hw;
        long long n = i / c;
        long long ch = i - n * c;
        float g_max = g[n * 2 * c + ch];
        float g_mean = g[n * 2 * c + c + ch] * inv;
        float* d = dx + i * hw;
        for (int j = 0; j < hw; ++j) d[j] = g_mean;
        d[plane_first_max(p, hw)] += g_max;
    }
}
