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
