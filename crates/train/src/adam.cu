// CUDA kernels of the fused Adam update (`adam_fused.rs`), compiled at run
// time with NVRTC: the same three in-place passes as the CPU path.

// avg = avg·beta + f(g)·(1 − beta), f(g) = g, or g·g when `squared`.
extern "C" __global__ void adam_average(
    float* avg, const float* g, long long len, float beta, float one_minus, int squared) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        float gv = squared ? g[i] * g[i] : g[i];
        avg[i] = avg[i] * beta + gv * one_minus;
    }
}

// p = decay?(p) − (grad_avg / (sqrt(sqr_avg·inv_debias2) + eps))·step_size.
extern "C" __global__ void adam_param(
    float* p, const float* grad_avg, const float* sqr_avg, long long len,
    float decay, int decays, float inv_debias2, float eps, float step_size) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        float value = decays ? p[i] * decay : p[i];
        float denom = sqrtf(sqr_avg[i] * inv_debias2) + eps;
        p[i] = value - (grad_avg[i] / denom) * step_size;
    }
}

// Up to MULTI parameters updated by one launch (`adam_fused.rs`'s
// `update_many`), passed by value: block b updates chunk
// b − first_block[k] of tensor k, where first_block[k] ≤ b < first_block[k+1].
#define MULTI 32

struct AdamTable {
    unsigned long long p[MULTI];
    unsigned long long g[MULTI];
    unsigned long long grad_avg[MULTI];
    unsigned long long sqr_avg[MULTI];
    long long len[MULTI];
    long long first_block[MULTI + 1];
    float step_size[MULTI];
    float decay[MULTI];
    float inv_debias2[MULTI];
    int decays[MULTI];
    int n;
};

// The three passes above in one, element by element in the same order
// (each moment, then the parameter from the new moments).
extern "C" __global__ void adam_multi(
    AdamTable t, float mom, float one_minus_mom, float sqr_mom, float one_minus_sqr_mom,
    float eps, long long chunk) {
    long long b = blockIdx.x;
    int k = 0;
    while (k + 1 < t.n && b >= t.first_block[k + 1]) {
        ++k;
    }
    long long start = (b - t.first_block[k]) * chunk;
    long long end = start + chunk < t.len[k] ? start + chunk : t.len[k];
    float* p = (float*)t.p[k];
    const float* g = (const float*)t.g[k];
    float* grad_avg = (float*)t.grad_avg[k];
    float* sqr_avg = (float*)t.sqr_avg[k];
    float step_size = t.step_size[k], decay = t.decay[k], inv_debias2 = t.inv_debias2[k];
    int decays = t.decays[k];
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float gv = g[i];
        float avg = grad_avg[i] * mom + gv * one_minus_mom;
        grad_avg[i] = avg;
        float sqr = sqr_avg[i] * sqr_mom + (gv * gv) * one_minus_sqr_mom;
        sqr_avg[i] = sqr;
        float value = decays ? p[i] * decay : p[i];
        float denom = sqrtf(sqr * inv_debias2) + eps;
        p[i] = value - (avg / denom) * step_size;
    }
}
