// darkspec: the [shortcut] layer as raw CUDA kernels (spec/cupy-backend.md).
//
// The definitions implemented here are those of reference/shortcut.py and reference/activations.py; the spec is
// spec/shortcut.md. Every kernel is `extern "C"`, instantiated below for float and double storage and for 32- or
// 64-bit element indices; the host picks one by name (backends/cupy_backend.py).
//
// Arithmetic rules, chosen so that the device rounds where the reference rounds:
// - the weighted sum, the normalization and every product/sum of the backward are done in the storage type T, in
//   the reference's order; compile with --fmad=false so that no product is fused into the following addition;
// - activations, their gradient factors and exp() of the softmax are evaluated in double and rounded once to T
//   (the reference evaluates them in float64 and rounds once);
// - weight gradients are summed in double with a fixed reduction tree (no atomics): same inputs, same bits.
//
// No header is included: the file compiles with nvcc and with NVRTC as it is.

#define DS_MAX_SLOTS 64      // inputs of one [shortcut] (the previous layer and the from= layers); host checks
#define DS_MAX_BLOCK 256     // threads of a block: a power of two in [32, 256]
#define DS_EPT 8             // elements of one plane each thread handles, in one chunk of the plane

// --- settings, as the host passes them ----------------------------------------------------------------------

enum { DS_NORM_NONE = 0, DS_NORM_RELU = 1, DS_NORM_SOFTMAX = 2 };

// The factor the backward multiplies the delta by.
enum { DS_GRAD_DARKNET_CPU = 0, DS_GRAD_DARKNET_GPU = 1, DS_GRAD_EXACT = 2, DS_GRAD_ZERO = 3 };

// What the backward accumulates into the weight updates.
enum { DS_WGRAD_NONE = 0, DS_WGRAD_SUM = 1, DS_WGRAD_GPU = 2, DS_WGRAD_EXACT = 3 };

// Activation codes: the elementwise names of reference/activations.py (backends/cupy_backend.py: ACTIVATIONS).
enum {
    DS_LINEAR = 0, DS_LEAKY = 1, DS_REVLEAKY = 2, DS_RELU = 3, DS_RELU6 = 4, DS_LOGISTIC = 5, DS_LOGGY = 6,
    DS_TANH = 7, DS_ELU = 8, DS_SELU = 9, DS_GELU = 10, DS_RELIE = 11, DS_RAMP = 12, DS_PLSE = 13,
    DS_HARDTAN = 14, DS_LHTAN = 15, DS_STAIR = 16, DS_SWISH = 17, DS_MISH = 18, DS_HARD_MISH = 19,
    // pjreddie's loggy and tanh, written in double as pjreddie writes them (they cancel near 0)
    DS_PJ_LOGGY = 20, DS_PJ_TANH = 21
};

// Darknet's decimal constants (reference/activations.py).
#define DS_SELU_LAMBDA 1.0507
#define DS_SELU_ALPHA 1.6732
#define DS_GELU_A 0.797885
#define DS_GELU_B 0.035677
#define DS_GELU_GRAD_B 0.0356774
#define DS_GELU_GRAD_C1 0.398942
#define DS_GELU_GRAD_C3 0.0535161
// The contract's constants come from Python (darkspec.reference.contract), as -D definitions: none is copied here.
#if !defined(DS_NORMALIZATION_EPS) || !defined(DS_RELU_FLOOR)
#error "compile with -DDS_NORMALIZATION_EPS=... -DDS_RELU_FLOOR=... (cupy_backend.CONTRACT_DEFINES)"
#endif

// --- small helpers ---------------------------------------------------------------------------------------------

__device__ __forceinline__ bool ds_finite(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool ds_finite(double v) {
    return (((unsigned long long)__double_as_longlong(v)) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}
template <typename T> __device__ __forceinline__ T ds_nan();
template <> __device__ __forceinline__ float ds_nan<float>() { return __uint_as_float(0x7fc00000u); }
template <> __device__ __forceinline__ double ds_nan<double>() { return __longlong_as_double(0x7ff8000000000000ll); }

// Stable forms, as the reference writes them (numpy's logaddexp).
__device__ __forceinline__ double ds_logaddexp0(double x) {  // log(1 + e^x)
    return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x));
}
__device__ __forceinline__ double ds_sigmoid(double x) { return exp(-ds_logaddexp0(-x)); }
__device__ __forceinline__ double ds_sech(double v) {  // 2 / (e^v + e^-v) = 2 exp(-logaddexp(v, -v))
    double a = fabs(v);
    return 2.0 * exp(-(a + log1p(exp(-2.0 * a))));
}

// --- activations (double in, double out; the caller rounds once) ------------------------------------------------

// stair as Darknet writes it, in the tensor's type: x - floor(x) is rounded there, which shows near integers.
template <typename T> __device__ __forceinline__ T ds_stair(T x) {
    T n = floor(x), half = floor(x / 2);
    return fmod((double)n, 2.0) == 0 ? half : (T)(x - n) + half;
}

__device__ __noinline__ double ds_activate(int act, double x) {
    switch (act) {
    case DS_LINEAR: return x;
    case DS_LEAKY:
    case DS_REVLEAKY: return x > 0 ? x : 0.1 * x;
    case DS_RELU: return x > 0 ? x : 0.0;
    case DS_RELU6: return x < 0 ? 0.0 : (x > 6 ? 6.0 : x);
    case DS_LOGISTIC: return ds_sigmoid(x);
    case DS_LOGGY: return tanh(x / 2);
    case DS_TANH: return tanh(x);
    case DS_PJ_LOGGY: return 2.0 / (1.0 + exp(-x)) - 1.0;
    case DS_PJ_TANH: { double e = exp(2.0 * x); return (e - 1.0) / (e + 1.0); }
    case DS_ELU: return x >= 0 ? x : expm1(x);
    case DS_SELU: return x >= 0 ? DS_SELU_LAMBDA * x : (DS_SELU_LAMBDA * DS_SELU_ALPHA) * expm1(x);
    case DS_GELU: {
        double u = DS_GELU_A * x + DS_GELU_B * (x * x * x);
        return x * ds_sigmoid(2 * u);
    }
    case DS_RELIE: return x > 0 ? x : 0.01 * x;
    case DS_RAMP: return (x > 0 ? x : 0.0) + 0.1 * x;
    case DS_PLSE: return x < -4 ? 0.01 * (x + 4) : (x > 4 ? 0.01 * (x - 4) + 1 : 0.125 * x + 0.5);
    case DS_HARDTAN: return x < -1 ? -1.0 : (x > 1 ? 1.0 : x);
    case DS_LHTAN: return x < 0 ? 0.001 * x : (x > 1 ? 0.001 * (x - 1) + 1 : x);
    case DS_STAIR: return ds_stair<double>(x);
    case DS_SWISH: return x * ds_sigmoid(x);
    case DS_MISH: return x * tanh(ds_logaddexp0(x));
    case DS_HARD_MISH: return x > 0 ? x : (x > -2 ? x * x / 2 + x : 0.0);
    }
    return ds_nan<double>();
}

// The true derivative; at a kink, the value Darknet's factor takes there.
__device__ __forceinline__ double ds_derivative(int act, double x) {
    switch (act) {
    case DS_LINEAR: return 1.0;
    case DS_LEAKY:
    case DS_REVLEAKY: return x > 0 ? 1.0 : 0.1;
    case DS_RELU: return x > 0 ? 1.0 : 0.0;
    case DS_RELU6: return (x > 0 && x < 6) ? 1.0 : 0.0;
    case DS_LOGISTIC: return ds_sigmoid(x) * ds_sigmoid(-x);
    case DS_LOGGY:
    case DS_PJ_LOGGY: return 2 * ds_sigmoid(x) * ds_sigmoid(-x);
    case DS_TANH:
    case DS_PJ_TANH: { double s = ds_sech(x); return s * s; }
    case DS_ELU: return x >= 0 ? 1.0 : exp(x);
    case DS_SELU: return x >= 0 ? DS_SELU_LAMBDA : (DS_SELU_LAMBDA * DS_SELU_ALPHA) * exp(x);
    case DS_GELU: {
        double u = DS_GELU_A * x + DS_GELU_B * (x * x * x);
        return ds_sigmoid(2 * u) * (1 + 2 * x * ds_sigmoid(-2 * u) * (DS_GELU_A + (3 * DS_GELU_B) * (x * x)));
    }
    case DS_RELIE: return x > 0 ? 1.0 : 0.01;
    case DS_RAMP: return x > 0 ? 1.1 : 0.1;
    case DS_PLSE: return (x < -4 || x > 4) ? 0.01 : 0.125;
    case DS_HARDTAN: return (x > -1 && x < 1) ? 1.0 : 0.0;
    case DS_LHTAN: return (x > 0 && x < 1) ? 1.0 : 0.001;
    case DS_STAIR: {
        double n = floor(x);
        return (fmod(n, 2.0) != 0 && x != n) ? 1.0 : 0.0;
    }
    case DS_SWISH: return ds_sigmoid(x) * (1 + x * ds_sigmoid(-x));
    case DS_MISH: {
        double sp = ds_logaddexp0(x), s = ds_sech(sp);
        return tanh(sp) + x * ds_sigmoid(x) * (s * s);
    }
    case DS_HARD_MISH: return x > 0 ? 1.0 : (x > -2 ? x + 1 : 0.0);
    }
    return ds_nan<double>();
}

// Darknet's factor as Darknet codes it: of the output y (mish and hard_mish: of x, the pre-activation, through
// ds_derivative in ds_factor_value; swish: of both).
__device__ __forceinline__ double ds_darknet_factor(int act, double y, double x, bool gpu) {
    switch (act) {
    case DS_LINEAR: return 1.0;
    case DS_LEAKY: return y > 0 ? 1.0 : 0.1;
    case DS_REVLEAKY: return y > 0 ? 1.0 : (gpu ? 1 / 0.1 : 0.1);  // the GPU kernel divides by 0.1
    case DS_RELU: return y > 0 ? 1.0 : 0.0;
    case DS_RELU6: return (y > 0 && y < 6) ? 1.0 : 0.0;
    case DS_LOGISTIC: return (1 - y) * y;
    case DS_LOGGY:
    case DS_PJ_LOGGY: { double t = (y + 1) / 2; return 2 * (1 - t) * t; }
    case DS_TANH:
    case DS_PJ_TANH: return 1 - y * y;
    case DS_ELU: return y >= 0 ? 1.0 : y + 1;
    case DS_SELU: return y >= 0 ? DS_SELU_LAMBDA : y + DS_SELU_LAMBDA * DS_SELU_ALPHA;
    case DS_GELU: {
        double y3 = y * y * y;
        double v = DS_GELU_GRAD_B * y3 + DS_GELU_A * y, s = ds_sech(v);
        return 0.5 * tanh(v) + (DS_GELU_GRAD_C3 * y3 + DS_GELU_GRAD_C1 * y) * (s * s) + 0.5;
    }
    case DS_RELIE: return y > 0 ? 1.0 : 0.01;
    case DS_RAMP: return y > 0 ? 1.1 : 0.1;
    case DS_PLSE: return (y < 0 || y > 1) ? 0.01 : 0.125;
    case DS_HARDTAN: return (y > -1 && y < 1) ? 1.0 : 0.0;
    case DS_LHTAN: return (y > 0 && y < 1) ? 1.0 : 0.001;
    case DS_STAIR: return floor(y) == y ? 0.0 : 1.0;
    case DS_SWISH: return y + ds_sigmoid(x) * (1 - y);
    }
    return ds_nan<double>();
}

// The factor the backward multiplies the delta by (grad is not DS_GRAD_ZERO): one call site for all of them.
__device__ __noinline__ double ds_factor_value(int act, int grad, double y, double x) {
    if (grad == DS_GRAD_EXACT || act == DS_MISH || act == DS_HARD_MISH) return ds_derivative(act, x);
    return ds_darknet_factor(act, y, x, grad == DS_GRAD_DARKNET_GPU);
}

// The activation functions above are called, not inlined (the unrolled loops would hold many copies of them);
// linear, the common case of a fusion layer, stays inline.
template <typename T> __device__ __forceinline__ T ds_forward_value(int act, int zero, T pre) {
    if (zero) return T(0);
    if (act == DS_STAIR) return ds_stair<T>(pre);
    return act == DS_LINEAR ? pre : (T)ds_activate(act, (double)pre);
}

template <typename T> __device__ __forceinline__ T ds_factor(int act, int grad, T out, T pre) {
    if (grad == DS_GRAD_ZERO) return T(0);
    if (act == DS_LINEAR) return T(1);
    return (T)ds_factor_value(act, grad, (double)out, (double)pre);
}

// --- the weight normalization of one k, into shared memory --------------------------------------------------------
//
// phi_i = w_i (none), relu(w_i) or max-floored w_i (relu), exp(w_i - max_j w_j) (softmax, exp in double);
// what_i = phi_i / (((eps + phi_0) + phi_1) + ... + phi_n), all in T. Every thread of the block must call it.

template <typename T>
__device__ void ds_normalize(const T* weights, int n_in, int per_input, int k, int norm, int floor_on, T* phi_s,
                             T* what_s) {
    for (int i = threadIdx.x; i < n_in; i += blockDim.x) {
        T w = weights[(long long)i * per_input + k];
        T phi = w;
        if (norm == DS_NORM_RELU) {
            T floor_value = floor_on ? (T)DS_RELU_FLOOR : T(0);
            phi = w > floor_value ? w : floor_value;
        } else if (norm == DS_NORM_SOFTMAX) {
            T m = weights[k];
            for (int j = 1; j < n_in; ++j) {
                T v = weights[(long long)j * per_input + k];
                m = v > m ? v : m;
            }
            phi = (T)exp((double)(w - m));
        }
        phi_s[i] = phi;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n_in; i += blockDim.x) {
        if (norm == DS_NORM_NONE) {
            what_s[i] = phi_s[i];
        } else {
            T total = (T)DS_NORMALIZATION_EPS;
            for (int j = 0; j < n_in; ++j) total = total + phi_s[j];
            what_s[i] = phi_s[i] / total;
        }
    }
    __syncthreads();
}

// The per-input pointers and sizes, copied once per block into shared memory: the element loops then read them
// there, not again from global memory after every store. Every thread of the block must call it.
template <typename T>
__device__ void ds_stage_inputs(const T* const* inputs, const long long* sizes, int n_in, const T** in_s,
                                long long* size_s) {
    for (int i = threadIdx.x; i < n_in; i += blockDim.x) {
        in_s[i] = inputs[i];
        size_s[i] = sizes[i];
    }
    __syncthreads();
}

// Sum of one double per thread, in a fixed tree; the result is in red[0]. Every thread of the block must call it.
__device__ void ds_block_sum(double* red, double value) {
    red[threadIdx.x] = value;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) red[threadIdx.x] = red[threadIdx.x] + red[threadIdx.x + stride];
        __syncthreads();
    }
}

// --- the pre-activation of one element ----------------------------------------------------------------------------
//
// pre[b, s] = x[b, s]*what_0 + sum over slots i >= 1 with s < A_i of in_i[b, s]*what_i, left to right (spec/shortcut.md
// "Forward"; the PRN rule). Without weights the products are left out. With the quirk cpu-fastpath-input-dims
// (one input, no weights) the whole batch is added flat: x[j] + in_1[j] for j < B*A_1, NaN (undefined) after.

template <typename T, typename I>
__device__ __forceinline__ T ds_pre(const T* const* inputs, const long long* sizes, int n_in, const T* what_s,
                                    bool weighted, int fastpath, I fast_limit, I b, I s, I j) {
    const T* x = inputs[0];
    if (fastpath) return j < fast_limit ? x[j] + inputs[1][j] : ds_nan<T>();
    T pre = weighted ? x[j] * what_s[0] : x[j];
    for (int i = 1; i < n_in; ++i) {
        I a = (I)sizes[i];
        if (s < a) {
            T v = inputs[i][b * a + s];
            pre = pre + (weighted ? v * what_s[i] : v);
        }
    }
    return pre;
}

// --- forward ---------------------------------------------------------------------------------------------------------
//
// Grid: x = B*C planes (sample b, channel c), y = chunks of a plane of H*W elements; each thread handles DS_EPT
// elements of its chunk, blockDim apart (coalesced). One k per block: the weights are normalized once per block.

template <typename T, typename I>
__device__ void ds_shortcut_forward(const T* const* inputs, const long long* sizes, int n_in, const T* weights,
                                    int per_input, int norm, int floor_on, int act, int zero_act, int fastpath,
                                    long long fast_limit, int channels, long long plane, T* out) {
    __shared__ T phi_s[DS_MAX_SLOTS];
    __shared__ T what_s[DS_MAX_SLOTS];
    __shared__ const T* in_s[DS_MAX_SLOTS];
    __shared__ long long size_s[DS_MAX_SLOTS];
    ds_stage_inputs(inputs, sizes, n_in, in_s, size_s);
    const I b = (I)(blockIdx.x / channels), c = (I)(blockIdx.x % channels);
    const bool weighted = per_input > 0;
    if (weighted) ds_normalize(weights, n_in, per_input, per_input == 1 ? 0 : (int)c, norm, floor_on, phi_s, what_s);
    const I hw = (I)plane, sample = (I)channels * hw;
    const I base = (I)blockIdx.y * (I)blockDim.x * DS_EPT + (I)threadIdx.x;
#pragma unroll
    for (int e = 0; e < DS_EPT; ++e) {
        I p = base + (I)e * (I)blockDim.x;
        if (p < hw) {
            I s = c * hw + p, j = b * sample + s;
            T pre = ds_pre<T, I>(in_s, size_s, n_in, what_s, weighted, fastpath, (I)fast_limit, b, s, j);
            out[j] = ds_forward_value<T>(act, zero_act, pre);
        }
    }
}

// --- backward: the deltas, and the first stage of the weight gradient ------------------------------------------------
//
// Grid: x = B*grid_channels planes, grid_channels = the largest channel count of any input, so that the elements of
// wider inputs past the output's size (which receive 0) are written in the same pass; y = chunks of a plane.
// Phase A (planes of the output): d = delta * factor(out, pre), written to d_out.
// Phase B, slot by slot: input_deltas[i][b, s] = d*what_i (or d) where s < min(S, A_i), 0 where S <= s < A_i; the
// block's sum of its weight-gradient terms goes to partials[((i*B + b)*C + c)*chunks + chunk] (C = channels):
//   DS_WGRAD_SUM, DS_WGRAD_EXACT: t = d*in_i;  DS_WGRAD_GPU: t = (d*in_i)*factor_i, NaN and infinite terms dropped,
// with factor_i = what_i (relu), what_i*(1 - what_i) (softmax), 1 (none). Each thread sums its terms in double in
// element order, then the block sums in a fixed tree: no atomics, the same bits every run.

template <typename T, typename I>
__device__ void ds_shortcut_backward(const T* const* inputs, const long long* sizes, int n_in, const T* weights,
                                     int per_input, int norm, int floor_on, int act, int zero_act, int grad,
                                     int fastpath, long long fast_limit, int channels, int grid_channels,
                                     long long plane, int batch, const T* delta, T* d_out, T* const* input_deltas,
                                     int wgrad, double* partials) {
    __shared__ T phi_s[DS_MAX_SLOTS];
    __shared__ T what_s[DS_MAX_SLOTS];
    __shared__ double red[DS_MAX_BLOCK];
    __shared__ const T* in_s[DS_MAX_SLOTS];
    __shared__ long long size_s[DS_MAX_SLOTS];
    ds_stage_inputs(inputs, sizes, n_in, in_s, size_s);
    const I b = (I)(blockIdx.x / grid_channels), c = (I)(blockIdx.x % grid_channels);
    const bool in_output = c < (I)channels;
    const bool weighted = per_input > 0;
    if (weighted && in_output)  // block-uniform condition
        ds_normalize(weights, n_in, per_input, per_input == 1 ? 0 : (int)c, norm, floor_on, phi_s, what_s);
    const I hw = (I)plane, sample = (I)channels * hw;
    const I base = (I)blockIdx.y * (I)blockDim.x * DS_EPT + (I)threadIdx.x;

    // Phase A. The loops of the backward are not unrolled: unrolled, the kernel's code grows tenfold (it inlines the
    // pre-activation and the factor into every copy) for no gain in a memory-bound pass.
#pragma unroll 1
    for (int e = 0; e < DS_EPT; ++e) {
        I p = base + (I)e * (I)blockDim.x;
        if (in_output && p < hw) {
            I s = c * hw + p, j = b * sample + s;
            T pre = ds_pre<T, I>(in_s, size_s, n_in, what_s, weighted, fastpath, (I)fast_limit, b, s, j);
            T out = ds_forward_value<T>(act, zero_act, pre);
            d_out[j] = delta[j] * ds_factor<T>(act, grad, out, pre);
        }
    }

    // Phase B. Each thread reads back the d it wrote itself (the same elements, in the same order).
    const bool terms = wgrad != DS_WGRAD_NONE && in_output;  // block-uniform
    for (int i = 0; i < n_in; ++i) {
        const I a = (I)size_s[i];
        const T* in = in_s[i];
        T* din = input_deltas[i];
        // d*1 is d, bit for bit: the unweighted delta needs no branch of its own.
        const T scale = weighted && in_output ? what_s[i] : T(1);
        T factor = T(1);
        if (wgrad == DS_WGRAD_GPU && in_output) {
            if (norm == DS_NORM_RELU) factor = scale;
            else if (norm == DS_NORM_SOFTMAX) factor = scale * (T(1) - scale);
        }
        const bool drop = wgrad == DS_WGRAD_GPU;
        double acc = 0.0;
#pragma unroll 1
        for (int e = 0; e < DS_EPT; ++e) {
            I p = base + (I)e * (I)blockDim.x;
            I s = c * hw + p;
            if (p < hw && s < a) {
                I k = b * a + s;
                if (!in_output) {
                    din[k] = T(0);
                    continue;
                }
                T d = d_out[b * sample + s];
                din[k] = d * scale;
                if (terms) {
                    T t = d * in[k];
                    if (drop) {
                        t = t * factor;
                        if (!ds_finite(t)) t = T(0);
                    }
                    acc += (double)t;
                }
            }
        }
        if (terms) {
            ds_block_sum(red, acc);
            if (threadIdx.x == 0)
                partials[(((long long)i * batch + (long long)b) * channels + (long long)c) * gridDim.y + blockIdx.y] =
                    red[0];
        }
    }
}

// --- the weight gradient, second stage, and the accumulator ----------------------------------------------------------
//
// One block per k (blockDim = DS_MAX_BLOCK). For each slot i the block sums the partials of weight (i, k) in a fixed
// order and tree: g_i. Then out[i*L + k] = init[i*L + k] + (T)r_i with r_i = g_i, or for DS_WGRAD_EXACT the true
// derivative w.r.t. the raw weight (spec/shortcut.md "Backward" 3), computed in double from g, w and what.

template <typename T>
__device__ void ds_shortcut_weight_reduce(const double* partials, int n_in, int batch, int channels, int chunks,
                                          const T* weights, int per_input, int norm, int floor_on, int wgrad,
                                          const T* init, T* out) {
    __shared__ T phi_s[DS_MAX_SLOTS];
    __shared__ T what_s[DS_MAX_SLOTS];
    __shared__ double g_s[DS_MAX_SLOTS];
    __shared__ double red[DS_MAX_BLOCK];
    const int k = blockIdx.x;
    ds_normalize(weights, n_in, per_input, k, norm, floor_on, phi_s, what_s);
    const long long per_slot = (long long)batch * channels * chunks;
    const long long count = per_input == 1 ? per_slot : (long long)batch * chunks;
    for (int i = 0; i < n_in; ++i) {
        double acc = 0.0;
        for (long long q = threadIdx.x; q < count; q += blockDim.x) {
            long long index;
            if (per_input == 1) {
                index = (long long)i * per_slot + q;
            } else {
                long long b = q / chunks, chunk = q % chunks;
                index = (((long long)i * batch + b) * channels + k) * chunks + chunk;
            }
            acc += partials[index];
        }
        ds_block_sum(red, acc);
        if (threadIdx.x == 0) g_s[i] = red[0];
        __syncthreads();
    }
    for (int i = threadIdx.x; i < n_in; i += blockDim.x) {
        double r = g_s[i];
        if (wgrad == DS_WGRAD_EXACT && norm != DS_NORM_NONE) {
            double w_max = (double)weights[k];
            int argmax = 0;
            for (int j = 1; j < n_in; ++j) {
                double v = (double)weights[(long long)j * per_input + k];
                if (v > w_max) { w_max = v; argmax = j; }
            }
            double phi_sum = 0.0, mixed = 0.0;
            for (int j = 0; j < n_in; ++j) {
                double w = (double)weights[(long long)j * per_input + k];
                phi_sum += norm == DS_NORM_SOFTMAX ? exp(w - w_max) : (w > 0 ? w : 0.0);
                mixed += g_s[j] * (double)what_s[j];
            }
            double total = DS_NORMALIZATION_EPS + phi_sum;
            double w_i = (double)weights[(long long)i * per_input + k];
            if (norm == DS_NORM_RELU) {
                r = (w_i > 0 ? 1.0 : 0.0) / total * (g_s[i] - mixed);
            } else {
                r = (double)what_s[i] * (g_s[i] - mixed) - (i == argmax ? mixed : 0.0) * DS_NORMALIZATION_EPS / total;
            }
        }
        long long at = (long long)i * per_input + k;
        out[at] = init[at] + (T)r;
    }
}

// --- update (spec/shortcut.md "Update"); the scalars are rounded to T by the host, in the reference's order ---------

// darknet-gpu: NaN/inf repair, clip to [-1, 1], no decay. The host skips the call during burn-in.
template <typename T>
__device__ void ds_shortcut_update_gpu(T* weights, T* updates, long long n, T scale, T momentum) {
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x) {
        T u = updates[j], w = weights[j];
        if (!ds_finite(u)) u = T(0);
        if (!ds_finite(w)) w = T(1) / ((T)j + T(1));
        u = u < T(-1) ? T(-1) : (u > T(1) ? T(1) : u);
        weights[j] = w + scale * u;
        updates[j] = u * momentum;
    }
}

// darknet-cpu and exact: decay, no clipping. decay_factor = -decay*batch, scale = lr/batch.
template <typename T>
__device__ void ds_shortcut_update_cpu(T* weights, T* updates, long long n, T decay_factor, T scale, T momentum) {
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x) {
        T w = weights[j];
        T u = updates[j] + decay_factor * w;
        weights[j] = w + scale * u;
        updates[j] = u * momentum;
    }
}

// --- pjreddie's two-input shortcut (spec/shortcut.md "pjreddie's two-input shortcut") ------------------------------
//
// Destination (k, j*sample, i*sample) of x meets source (k, j*stride, i*stride) of from for k < min_c, j < min_h,
// i < min_w. Forward: out = act(x), or act(alpha*x + beta*from) where they meet. Backward, one launch over the
// elements of x (index < n_x) and then those of from: d = delta*factor; dx = alpha*d everywhere; dfrom = beta*d at
// the sources that meet, 0 elsewhere (the destination's d is recomputed there).

struct ds_pj_dims {
    long long c2, h2, w2, c1, h1, w1, stride, sample, min_c, min_h, min_w;
};

template <typename T, typename I>
__device__ __forceinline__ T ds_pj_pre(const T* x, const T* from, I jx, I b, I k, I y, I xx, const ds_pj_dims& g,
                                       T alpha, T beta) {
    const I sample = (I)g.sample;
    if (k < (I)g.min_c && y % sample == 0 && xx % sample == 0 && y / sample < (I)g.min_h &&
        xx / sample < (I)g.min_w) {
        I src = ((b * (I)g.c1 + k) * (I)g.h1 + (y / sample) * (I)g.stride) * (I)g.w1 + (xx / sample) * (I)g.stride;
        return alpha * x[jx] + beta * from[src];
    }
    return x[jx];
}

template <typename T, typename I>
__device__ void ds_pjreddie_forward(const T* x, const T* from, T* out, long long n_x, long long c2, long long h2,
                                    long long w2, long long c1, long long h1, long long w1, long long stride,
                                    long long sample, T alpha, T beta, int act) {
    ds_pj_dims g = {c2, h2, w2, c1, h1, w1, stride, sample, c1 < c2 ? c1 : c2, h1 < h2 ? h1 : h2, w1 < w2 ? w1 : w2};
    for (I j = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; j < (I)n_x; j += (I)gridDim.x * (I)blockDim.x) {
        I xx = j % (I)w2, y = (j / (I)w2) % (I)h2, k = (j / ((I)w2 * (I)h2)) % (I)c2, b = j / ((I)w2 * (I)h2 * (I)c2);
        out[j] = ds_forward_value<T>(act, 0, ds_pj_pre<T, I>(x, from, j, b, k, y, xx, g, alpha, beta));
    }
}

template <typename T, typename I>
__device__ void ds_pjreddie_backward(const T* x, const T* from, const T* delta, T* d_out, T* dx, T* dfrom,
                                     long long n_x, long long n_from, long long c2, long long h2, long long w2,
                                     long long c1, long long h1, long long w1, long long stride, long long sample,
                                     T alpha, T beta, int act) {
    ds_pj_dims g = {c2, h2, w2, c1, h1, w1, stride, sample, c1 < c2 ? c1 : c2, h1 < h2 ? h1 : h2, w1 < w2 ? w1 : w2};
    const I total = (I)n_x + (I)n_from;
    for (I q = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; q < total; q += (I)gridDim.x * (I)blockDim.x) {
        if (q < (I)n_x) {
            I j = q;
            I xx = j % (I)w2, y = (j / (I)w2) % (I)h2, k = (j / ((I)w2 * (I)h2)) % (I)c2;
            I b = j / ((I)w2 * (I)h2 * (I)c2);
            T pre = ds_pj_pre<T, I>(x, from, j, b, k, y, xx, g, alpha, beta);
            T out = ds_forward_value<T>(act, 0, pre);
            T d = delta[j] * ds_factor<T>(act, DS_GRAD_DARKNET_CPU, out, pre);
            d_out[j] = d;
            dx[j] = alpha * d;
        } else {
            I f = q - (I)n_x;
            I xs = f % (I)w1, ys = (f / (I)w1) % (I)h1, k = (f / ((I)w1 * (I)h1)) % (I)c1;
            I b = f / ((I)w1 * (I)h1 * (I)c1);
            const I st = (I)g.stride;
            T value = T(0);
            if (k < (I)g.min_c && ys % st == 0 && xs % st == 0 && ys / st < (I)g.min_h && xs / st < (I)g.min_w) {
                I y = (ys / st) * (I)sample, xx = (xs / st) * (I)sample;
                I j = ((b * (I)c2 + k) * (I)h2 + y) * (I)w2 + xx;
                T pre = alpha * x[j] + beta * from[f];
                T out = ds_forward_value<T>(act, 0, pre);
                T d = delta[j] * ds_factor<T>(act, DS_GRAD_DARKNET_CPU, out, pre);
                value = beta * d;
            }
            dfrom[f] = value;
        }
    }
}

// --- the kernels -------------------------------------------------------------------------------------------------------

#define DS_SHORTCUT_KERNELS(T, I, SUFFIX)                                                                             \
    extern "C" __global__ void shortcut_forward_##SUFFIX(                                                             \
        const T* const* inputs, const long long* sizes, int n_in, const T* weights, int per_input, int norm,         \
        int floor_on, int act, int zero_act, int fastpath, long long fast_limit, int channels, long long plane,      \
        T* out) {                                                                                                     \
        ds_shortcut_forward<T, I>(inputs, sizes, n_in, weights, per_input, norm, floor_on, act, zero_act, fastpath,   \
                                  fast_limit, channels, plane, out);                                                  \
    }                                                                                                                 \
    extern "C" __global__ void shortcut_backward_##SUFFIX(                                                            \
        const T* const* inputs, const long long* sizes, int n_in, const T* weights, int per_input, int norm,         \
        int floor_on, int act, int zero_act, int grad, int fastpath, long long fast_limit, int channels,             \
        int grid_channels, long long plane, int batch, const T* delta, T* d_out, T* const* input_deltas, int wgrad, \
        double* partials) {                                                                                           \
        ds_shortcut_backward<T, I>(inputs, sizes, n_in, weights, per_input, norm, floor_on, act, zero_act, grad,      \
                                   fastpath, fast_limit, channels, grid_channels, plane, batch, delta, d_out,         \
                                   input_deltas, wgrad, partials);                                                    \
    }

#define DS_PJREDDIE_KERNELS(T, I, SUFFIX)                                                                             \
    extern "C" __global__ void pjreddie_forward_##SUFFIX(                                                             \
        const T* x, const T* from, T* out, long long n_x, long long c2, long long h2, long long w2, long long c1,     \
        long long h1, long long w1, long long stride, long long sample, T alpha, T beta, int act) {                  \
        ds_pjreddie_forward<T, I>(x, from, out, n_x, c2, h2, w2, c1, h1, w1, stride, sample, alpha, beta, act);      \
    }                                                                                                                 \
    extern "C" __global__ void pjreddie_backward_##SUFFIX(                                                            \
        const T* x, const T* from, const T* delta, T* d_out, T* dx, T* dfrom, long long n_x, long long n_from,       \
        long long c2, long long h2, long long w2, long long c1, long long h1, long long w1, long long stride,        \
        long long sample, T alpha, T beta, int act) {                                                                 \
        ds_pjreddie_backward<T, I>(x, from, delta, d_out, dx, dfrom, n_x, n_from, c2, h2, w2, c1, h1, w1, stride,    \
                                   sample, alpha, beta, act);                                                         \
    }

#define DS_SHORTCUT_TYPE_KERNELS(T, SUFFIX)                                                                           \
    extern "C" __global__ void shortcut_weight_reduce_##SUFFIX(                                                       \
        const double* partials, int n_in, int batch, int channels, int chunks, const T* weights, int per_input,      \
        int norm, int floor_on, int wgrad, const T* init, T* out) {                                                   \
        ds_shortcut_weight_reduce<T>(partials, n_in, batch, channels, chunks, weights, per_input, norm, floor_on,     \
                                     wgrad, init, out);                                                               \
    }                                                                                                                 \
    extern "C" __global__ void shortcut_update_gpu_##SUFFIX(T* weights, T* updates, long long n, T scale,            \
                                                            T momentum) {                                             \
        ds_shortcut_update_gpu<T>(weights, updates, n, scale, momentum);                                              \
    }                                                                                                                 \
    extern "C" __global__ void shortcut_update_cpu_##SUFFIX(T* weights, T* updates, long long n, T decay_factor,     \
                                                            T scale, T momentum) {                                    \
        ds_shortcut_update_cpu<T>(weights, updates, n, decay_factor, scale, momentum);                                \
    }

// Which kernels one compilation instantiates. With no DS_SKIP_* definition, all of them (what CI compiles). The
// backend compiles one module per storage type, index width and family at first use, skipping the rest
// (-DDS_SKIP_F64 -DDS_SKIP_I64 -DDS_SKIP_PJREDDIE for a float32 [shortcut] of fewer than 2^31 elements): each heavy
// kernel carries its own copy of the activation library, so a module of all of them takes several times longer to
// compile than the one a call needs.
#if !defined(DS_SKIP_SHORTCUT)
#if !defined(DS_SKIP_F32) && !defined(DS_SKIP_I32)
DS_SHORTCUT_KERNELS(float, int, f32_i32)
#endif
#if !defined(DS_SKIP_F32) && !defined(DS_SKIP_I64)
DS_SHORTCUT_KERNELS(float, long long, f32_i64)
#endif
#if !defined(DS_SKIP_F64) && !defined(DS_SKIP_I32)
DS_SHORTCUT_KERNELS(double, int, f64_i32)
#endif
#if !defined(DS_SKIP_F64) && !defined(DS_SKIP_I64)
DS_SHORTCUT_KERNELS(double, long long, f64_i64)
#endif
#if !defined(DS_SKIP_F32)
DS_SHORTCUT_TYPE_KERNELS(float, f32)
#endif
#if !defined(DS_SKIP_F64)
DS_SHORTCUT_TYPE_KERNELS(double, f64)
#endif
#endif

#if !defined(DS_SKIP_PJREDDIE)
#if !defined(DS_SKIP_F32) && !defined(DS_SKIP_I32)
DS_PJREDDIE_KERNELS(float, int, f32_i32)
#endif
#if !defined(DS_SKIP_F32) && !defined(DS_SKIP_I64)
DS_PJREDDIE_KERNELS(float, long long, f32_i64)
#endif
#if !defined(DS_SKIP_F64) && !defined(DS_SKIP_I32)
DS_PJREDDIE_KERNELS(double, int, f64_i32)
#endif
#if !defined(DS_SKIP_F64) && !defined(DS_SKIP_I64)
DS_PJREDDIE_KERNELS(double, long long, f64_i64)
#endif
#endif
