// Drafting kernels: one thread block per call works on one row of logits (the draft decodes
// one sequence at a time). References: specedge/speculative.py (softmax, truncate, quantize,
// sample_sparse) and specedge/protocol/wire.py (encode_q); tests/test_kernels.py compares them.
//
//   greedy_argmax   the argmax and its softmax probability (the draft's confidence)
//   draft_sample    temperature, softmax, top-k, top-p, fixed-point quantisation to counts
//                   summing to 2^16 (largest remainder) and the inverse-CDF draw, fused: the
//                   vocabulary is read a fixed number of times by all threads, only the at most
//                   255 candidates are sorted, in shared memory
//   encode_q        one drafted token's q in its wire form
//
// Launch with THREADS threads and one block. Compiled ahead with nvcc (kernels/build.py, CI
// compiles it) or at run time with pycuda's SourceModule (kernels/cuda.py).

#include <stdint.h>

#define THREADS 1024
#define CAP 256  // candidates: q_top_k is 1..255
#define Q_ONE 65536

extern "C" {

__device__ __forceinline__ bool ahead(float a, int ia, float b, int ib) {
    return a > b || (a == b && ia < ib);  // larger first, the lower id on a tie (as the reference)
}

// A float's order as an unsigned integer: larger float, larger key (NaN-free input).
__device__ __forceinline__ uint32_t order_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ void block_argmax(float& value, int& index, float* sv, int* si) {
    int t = threadIdx.x;
    sv[t] = value;
    si[t] = index;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s && ahead(sv[t + s], si[t + s], sv[t], si[t])) {
            sv[t] = sv[t + s];
            si[t] = si[t + s];
        }
        __syncthreads();
    }
    value = sv[0];
    index = si[0];
    __syncthreads();
}

__device__ double block_sum(double v, double* sd) {
    int t = threadIdx.x;
    sd[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) sd[t] += sd[t + s];
        __syncthreads();
    }
    double total = sd[0];
    __syncthreads();
    return total;
}

__device__ int block_count(int v, int* si) {
    int t = threadIdx.x;
    si[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) si[t] += si[t + s];
        __syncthreads();
    }
    int total = si[0];
    __syncthreads();
    return total;
}

// Exclusive prefix sum of one int per thread (Hillis-Steele in shared memory).
__device__ int block_exclusive_scan(int v, int* si) {
    int t = threadIdx.x;
    si[t] = v;
    __syncthreads();
    for (int offset = 1; offset < blockDim.x; offset <<= 1) {
        int add = t >= offset ? si[t - offset] : 0;
        __syncthreads();
        si[t] += add;
        __syncthreads();
    }
    int inclusive = si[t];
    __syncthreads();
    return inclusive - v;
}

// Bitonic sort of CAP (key, id) pairs in shared memory: key descending, id ascending.
__device__ void sort_pairs(double* key, int* id) {
    for (int size = 2; size <= CAP; size <<= 1) {
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            int t = threadIdx.x;
            if (t < CAP) {
                int other = t ^ stride;
                if (other > t) {
                    bool first = (t & size) == 0;  // this run sorts "ahead first"
                    bool swap = first ? (key[other] > key[t] || (key[other] == key[t] && id[other] < id[t]))
                                      : (key[t] > key[other] || (key[t] == key[other] && id[t] < id[other]));
                    if (swap) {
                        double k = key[t]; key[t] = key[other]; key[other] = k;
                        int i = id[t]; id[t] = id[other]; id[other] = i;
                    }
                }
            }
            __syncthreads();
        }
    }
}

__global__ void greedy_argmax(const float* logits, int n, int* token, float* confidence) {
    __shared__ float sv[THREADS];
    __shared__ int si[THREADS];
    __shared__ double sd[THREADS];
    float best = -INFINITY;
    int index = n;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        if (ahead(logits[j], j, best, index)) { best = logits[j]; index = j; }
    block_argmax(best, index, sv, si);
    double sum = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) sum += exp((double)logits[j] - (double)best);
    sum = block_sum(sum, sd);
    if (threadIdx.x == 0) {
        *token = index;
        *confidence = (float)(1.0 / sum);
    }
}

__global__ void draft_sample(const float* logits, int n, float temperature, int top_k, float top_p,
                             uint32_t draw, uint32_t* ids_out, int* counts_out, int* n_out, int* token_out) {
    __shared__ float sv[THREADS];
    __shared__ int si[THREADS];
    __shared__ double sd[THREADS];
    __shared__ double key[CAP];
    __shared__ int id[CAP];
    __shared__ int taken;
    const int t = threadIdx.x;
    const double inv_t = 1.0 / (double)temperature;

    // The largest scaled logit and the softmax denominator over the whole vocabulary.
    float best = -INFINITY;
    int where = n;
    for (int j = t; j < n; j += blockDim.x)
        if (ahead(logits[j], j, best, where)) { best = logits[j]; where = j; }
    block_argmax(best, where, sv, si);
    double total = 0.0;
    for (int j = t; j < n; j += blockDim.x) total += exp(((double)logits[j] - (double)best) * inv_t);
    total = block_sum(total, sd);

    // The k-th largest logit by radix select on order keys: `prefix` ends as its key.
    const int k = min(top_k, n);
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
        uint32_t candidate = prefix | (1u << bit);
        int count = 0;
        for (int j = t; j < n; j += blockDim.x) count += order_key(logits[j]) >= candidate;
        if (block_count(count, si) >= k) prefix = candidate;
    }
    // Gather: every logit above the k-th, then the lowest ids among those equal to it.
    if (t < CAP) { key[t] = -INFINITY; id[t] = 0x7fffffff; }
    if (t == 0) taken = 0;
    __syncthreads();
    for (int j = t; j < n; j += blockDim.x)
        if (order_key(logits[j]) > prefix) {
            int slot = atomicAdd(&taken, 1);
            key[slot] = (double)logits[j];
            id[slot] = j;
        }
    __syncthreads();
    for (int base = 0; base < n && taken < k; base += blockDim.x) {
        int j = base + t;
        int tie = j < n && order_key(logits[j]) == prefix;
        int rank = block_exclusive_scan(tie, si);
        int have = taken;
        __syncthreads();
        if (tie && have + rank < k) {
            key[have + rank] = (double)logits[j];
            id[have + rank] = j;
        }
        int ties = block_count(tie, si);
        if (t == 0) taken = min(k, have + ties);
        __syncthreads();
    }
    sort_pairs(key, id);

    if (t == 0) {
        // Probabilities of the kept candidates, most likely first; top-p keeps the shortest
        // prefix whose mass reaches top_p of theirs (numpy searchsorted, side left, + 1).
        double kept_sum = 0.0;
        for (int i = 0; i < k; ++i) {
            key[i] = exp((key[i] - (double)best) * inv_t) / total;
            kept_sum += key[i];
        }
        int cut = k;
        if (top_p < 1.0f) {
            double target = (double)top_p * kept_sum, run = 0.0;
            cut = k;
            for (int i = 0; i < k; ++i) {
                run += key[i];
                if (run >= target) { cut = i + 1; break; }
            }
        }
        double mass = 0.0;
        for (int i = 0; i < cut; ++i) mass += key[i];
        int sum = 0;
        for (int i = 0; i < cut; ++i) {
            double scaled = key[i] / mass * Q_ONE;
            int count = (int)floor(scaled);
            counts_out[i] = count;
            key[i] = scaled - count;  // the remainder, for the largest-remainder round
            sum += count;
        }
        n_out[0] = cut;
        n_out[1] = Q_ONE - sum;  // units still to hand out
        for (int i = cut; i < CAP; ++i) { key[i] = -INFINITY; }
        for (int i = 0; i < CAP; ++i) ids_out[i] = i < cut ? (uint32_t)id[i] : 0u;
        for (int i = 0; i < CAP; ++i) id[i] = i;  // now sort positions by remainder
    }
    __syncthreads();
    sort_pairs(key, id);
    if (t == 0) {
        int cut = n_out[0], short_by = n_out[1];
        for (int i = 0; i < short_by; ++i) counts_out[id[i]] += 1;
        // A candidate that rounds to nothing is not in q's support.
        int m = 0;
        for (int i = 0; i < cut; ++i)
            if (counts_out[i] > 0) { ids_out[m] = ids_out[i]; counts_out[m] = counts_out[i]; ++m; }
        n_out[0] = m;
        n_out[1] = 0;
        // Inverse CDF: the first entry whose running count exceeds the draw.
        int run = 0, chosen = m - 1;
        for (int i = 0; i < m; ++i) {
            run += counts_out[i];
            if (run > (int)draw) { chosen = i; break; }
        }
        *token_out = (int)ids_out[chosen];
    }
}

// q of one drafted token on the wire: n u8 | place of the token in q u8 | n ids (3 bytes, LE) |
// n (count - 1) (u16, LE). `out` holds 2 + 5n bytes.
__global__ void encode_q(const uint32_t* ids, const int* counts, int n, uint32_t token, uint8_t* out) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        uint32_t v = ids[i];
        out[2 + 3 * i] = v & 0xff;
        out[3 + 3 * i] = (v >> 8) & 0xff;
        out[4 + 3 * i] = (v >> 16) & 0xff;
        uint32_t c = (uint32_t)(counts[i] - 1);
        out[2 + 3 * n + 2 * i] = c & 0xff;
        out[3 + 3 * n + 2 * i] = (c >> 8) & 0xff;
        if (v == token) out[1] = (uint8_t)i;
    }
    if (threadIdx.x == 0) out[0] = (uint8_t)n;
}

}  // extern "C"
