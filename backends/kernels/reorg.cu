// darkspec: [reorg3d] and the old [reorg] as one raw CUDA gather (spec/cupy-backend.md, spec/reorg.md).
//
// Both layers, in both directions, are Darknet's reorg_cpu(x, w, h, c, batch, stride, forward, out) with the
// dimensions and the direction the host computes from reference/reorg.py (_plan). reorg_cpu pairs a small tensor
// Sm (batch, c, h, w) with a large tensor Lg (batch, c/s^2, h*s, w*s):
//
//     Sm[b, (dy*s + dx)*(c/s^2) + c2, j, i]  <->  Lg[b, c2, j*s + dy, i*s + dx]
//
// forward=0 writes out laid out as Sm from x laid out as Lg; forward=1 writes out laid out as Lg from x laid out as
// Sm. Darknet loops over Sm for both; here each thread owns one element of *out* and reads the element of x that
// lands there (a gather: coalesced writes, no two threads write one element). The pairing is a bijection when c is
// a multiple of s^2, which the host has checked.
//
// Values are moved as unsigned integers of the element's width, never as floats: NaN payloads, signed zeros and
// every other bit pattern arrive unchanged. No header is included: the file compiles with nvcc and NVRTC as it is.

template <typename E, typename I>
__device__ void ds_reorg_gather(const E* x, E* out, long long w, long long h, long long c, long long batch,
                                long long stride, int forward) {
    const I s = (I)stride, wi = (I)w, hi = (I)h, ci = (I)c;
    const I c_large = ci / (s * s);
    const I total = (I)batch * ci * hi * wi;
    for (I o = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; o < total; o += (I)gridDim.x * (I)blockDim.x) {
        I small, large;
        if (!forward) {
            // out is Sm: o = ((b*c + k)*h + j)*w + i
            small = o;
            I i = o % wi, j = (o / wi) % hi, k = (o / (wi * hi)) % ci, b = o / (wi * hi * ci);
            I c2 = k % c_large, offset = k / c_large;
            I w2 = i * s + offset % s, h2 = j * s + offset / s;
            large = w2 + wi * s * (h2 + hi * s * (c2 + c_large * b));
            out[small] = x[large];
        } else {
            // out is Lg: o = ((b*c_large + c2)*(h*s) + h2)*(w*s) + w2
            large = o;
            I ws = wi * s, hs = hi * s;
            I w2 = o % ws, h2 = (o / ws) % hs, c2 = (o / (ws * hs)) % c_large, b = o / (ws * hs * c_large);
            I i = w2 / s, dx = w2 % s, j = h2 / s, dy = h2 % s;
            I k = (dy * s + dx) * c_large + c2;
            small = i + wi * (j + hi * (k + ci * b));
            out[large] = x[small];
        }
    }
}

#define DS_REORG_KERNEL(E, I, SUFFIX)                                                                                 \
    extern "C" __global__ void reorg_gather_##SUFFIX(const E* x, E* out, long long w, long long h, long long c,      \
                                                     long long batch, long long stride, int forward) {               \
        ds_reorg_gather<E, I>(x, out, w, h, c, batch, stride, forward);                                               \
    }

DS_REORG_KERNEL(unsigned char, int, u8_i32)
DS_REORG_KERNEL(unsigned char, long long, u8_i64)
DS_REORG_KERNEL(unsigned short, int, u16_i32)
DS_REORG_KERNEL(unsigned short, long long, u16_i64)
DS_REORG_KERNEL(unsigned int, int, u32_i32)
DS_REORG_KERNEL(unsigned int, long long, u32_i64)
DS_REORG_KERNEL(unsigned long long, int, u64_i32)
DS_REORG_KERNEL(unsigned long long, long long, u64_i64)
