// CUDA kernels of multilabel-resnet, compiled at run time with NVRTC
// (`cuda/mod.rs`). f32 data, f64 accumulation for the per-channel sums
// (as the CPU kernels do), one block per channel for reductions.
//
// Layouts: activations are contiguous [N, C, HW]; per-channel results are
// rows of a [rows, C] array.

#define BLOCK 256

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
extern "C" __global__ void bn_stats(
    const float* x, const float* w, const float* b, float* stats,
    int n, int c, int hw, double eps) {
    __shared__ double shared[BLOCK];
    int ch = blockIdx.x;
    long long count = (long long)n * hw;
    double s = 0.0;
    for (long long i = threadIdx.x; i < count; i += BLOCK) {
        s += (double)x[at(i, c, hw, ch)];
    }
    double mean = block_sum(s, shared) / (double)count;
    float m = (float)mean;
    double q = 0.0;
    for (long long i = threadIdx.x; i < count; i += BLOCK) {
        float d = x[at(i, c, hw, ch)] - m;
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
extern "C" __global__ void bn_apply(
    const float* x, const float* stats, const float* residual, float* y,
    long long len, int c, int hw, int relu) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % c);
        float v = x[i] * stats[3 * c + ch] + stats[4 * c + ch];
        if (residual) {
            v = v + residual[i];
        }
        y[i] = relu && v < 0.0f ? 0.0f : v;
    }
}

// out = g where y > 0, else 0: the ReLU's backward from its output (the
// residual's gradient at the end of a block).
extern "C" __global__ void relu_mask(
    const float* y, const float* g, float* out, long long len) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = y[i] > 0.0f ? g[i] : 0.0f;
    }
}

// Backward reduction of channel blockIdx.x, into `red` [5, C]: dweight,
// dbias, and the three coefficients of dx = k1·g − k2 − k3·(x − mean).
// With `relu`, the gradient is zero where the output `y` is not positive.
extern "C" __global__ void bn_grad_reduce(
    const float* x, const float* y, const float* g, const float* stats,
    const float* w, float* red, int n, int c, int hw, int relu) {
    __shared__ double shared[BLOCK];
    int ch = blockIdx.x;
    long long count = (long long)n * hw;
    float m = stats[ch];
    double sg = 0.0, sgx = 0.0;
    for (long long i = threadIdx.x; i < count; i += BLOCK) {
        long long k = at(i, c, hw, ch);
        float gv = relu && y[k] <= 0.0f ? 0.0f : g[k];
        sg += (double)gv;
        sgx += (double)(gv * (x[k] - m));
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
extern "C" __global__ void bn_grad_input(
    const float* x, const float* y, const float* g, const float* stats,
    const float* red, float* dx, long long len, int c, int hw, int relu) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % c);
        float gv = relu && y[i] <= 0.0f ? 0.0f : g[i];
        dx[i] = red[2 * c + ch] * gv - red[3 * c + ch] - red[4 * c + ch] * (x[i] - stats[ch]);
    }
}
