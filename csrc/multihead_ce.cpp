// CPU kernels of fastmtl.ops.multihead_ce (module fastmtl._multihead_ce).
//
// Plain pybind11 + numpy buffers (no torch headers): the torch side hands over zero-copy
// .numpy() views of contiguous CPU tensors and preallocated outputs.
//
// Why this beats the reference (z @ weight.T over all C classes, then a gather): a sample
// only needs the n logits of its own task's head, so the work is N*n*d instead of N*C*d,
// log-softmax + cross-entropy + per-task mean are fused into the same pass over z, and no
// (N, C) or (N, n) logits tensor is ever written. The backward recomputes the n logits per
// row (cheaper than keeping them) and forms grad z and the grad weight partials in that
// one pass.
//
// Race-free grad weight: samples are counting-sorted by task and cut into chunks of at
// most kChunk samples that never straddle a task; each chunk owns a private (n, d) slab
// of partial sums. A second, short pass reduces the slabs into weight rows, parallel over
// (class row, column block), each output owned by one thread, summing its slabs in a fixed
// (chunk, slot) order. So rows shared by several tasks accumulate without atomics or locks,
// and the result is bitwise identical whatever the thread count (per-thread (C, d) buffers
// would depend on the thread count and cost threads*C*d to reduce).
//
// Portability: the hot loops are compiled for x86-64-v4 (AVX-512), v3 (AVX2+FMA) and the
// baseline, picked at load time (GCC/Clang target_clones), so the wheel needs no -march.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kChunk = 32;     // samples per partial slab: enough rows to amortise a slab
constexpr int64_t kColBlock = 256; // columns per reduction work item
constexpr int64_t kSub = 8;        // rows whose logits the backward computes together

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMTL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMTL_CLONES
#endif
#define FASTMTL_INLINE inline __attribute__((always_inline))

struct Plan {
    std::vector<int64_t> order;                              // sample ids grouped by task
    std::vector<int64_t> count;                              // samples per task
    std::vector<int64_t> chunk_task, chunk_begin, chunk_end; // ranges into `order`
};

// O(N + T*n) index checks with the messages of fastmtl.ops._check. check_indices runs them
// at the Python boundary before any kernel; make_plan repeats them (they are cheap) so a
// call with check=False cannot read out of bounds either.
std::vector<int64_t> check_and_count(const int64_t* st, const int64_t* tc, const int64_t* y,
                                     int64_t N, int64_t T, int64_t n, int64_t C,
                                     bool require_all_tasks) {
    auto range_error = [](const char* name, int64_t hi) {
        return py::value_error(std::string(name) + " values must lie in [0, " + std::to_string(hi) + ")");
    };
    for (int64_t k = 0; k < T * n; ++k)
        if (tc[k] < 0 || tc[k] >= C) throw range_error("task_classes", C);
    std::vector<int64_t> count(T, 0);
    for (int64_t i = 0; i < N; ++i)
        if (st[i] < 0 || st[i] >= T) throw range_error("sample_task", T);
    for (int64_t i = 0; i < N; ++i)
        if (y[i] < 0 || y[i] >= n) throw range_error("labels", n);
    for (int64_t i = 0; i < N; ++i) ++count[st[i]];
    if (require_all_tasks)
        for (int64_t t = 0; t < T; ++t)
            if (count[t] == 0)
                throw py::value_error("every task in task_classes needs at least one sample in sample_task");
    return count;
}

Plan make_plan(const int64_t* st, const int64_t* tc, const int64_t* y, int64_t N, int64_t T,
               int64_t n, int64_t C) {
    Plan p;
    p.count = check_and_count(st, tc, y, N, T, n, C, false);
    std::vector<int64_t> next(T, 0);
    for (int64_t t = 1; t < T; ++t) next[t] = next[t - 1] + p.count[t - 1];
    std::vector<int64_t> first = next;
    p.order.resize(N);
    for (int64_t i = 0; i < N; ++i) p.order[next[st[i]]++] = i;  // stable counting sort
    const int64_t n_chunks_max = N / kChunk + T;
    p.chunk_task.reserve(n_chunks_max);
    p.chunk_begin.reserve(n_chunks_max);
    p.chunk_end.reserve(n_chunks_max);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t b = first[t]; b < first[t] + p.count[t]; b += kChunk) {
            p.chunk_task.push_back(t);
            p.chunk_begin.push_back(b);
            p.chunk_end.push_back(std::min(b + kChunk, first[t] + p.count[t]));
        }
    return p;
}

// Threads for `work` multiply-adds: one thread per ~256K (15-30 us of work). A parallel
// region costs microseconds on an idle machine but can wait milliseconds on a loaded one
// (the region ends when its last thread has been scheduled), so the smallest calls stay on
// one thread, as ATen's grain size does for its ops. Measured on the idle 2-core machine
// (benchmarks/results/ops_cpu.json): with a 2M grain the Conv-4 shapes (d = 64, T = 8, 16)
// ran on one thread while the reference used two (1.5-1.7x); with 256K they reach 2.2-2.8x.
// On a loaded machine, torch.set_num_threads(1) (or OMP_NUM_THREADS=1) is the safe choice.
int threads_for(int nthreads, int64_t work) {
    constexpr int64_t kGrain = int64_t(1) << 18;
    return int(std::max<int64_t>(1, std::min<int64_t>(nthreads, work / kGrain)));
}

// Lanes of a dot-product accumulator: one 64-byte vector (16 floats, 8 doubles). Each
// lane sums its own strided terms, so the loops vectorise without reassociation (no
// -ffast-math) on any vector width, and the lanes are folded by a short tree at the end.
// (`omp simd reduction` also vectorises, but GCC folds its lanes with a serial chain of
// scalar adds through the stack, which cost as much as the dot itself at d = 64.)
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

// Halving steps of compile-time width, so each is one (or two) vector adds.
template <typename T, int W>
FASTMTL_INLINE T fold_lanes(T* a) {
    if constexpr (W == 1) {
        return a[0];
    } else {
        for (int l = 0; l < W / 2; ++l) a[l] += a[l + W / 2];
        return fold_lanes<T, W / 2>(a);
    }
}
template <typename T>
FASTMTL_INLINE T fold_lanes(T* a) { return fold_lanes<T, kLanes<T>>(a); }

// The n logits of one row, four head rows per sweep so each z element is loaded once per
// four dot products.
template <typename T>
FASTMTL_INLINE void row_logits(const T* zi, const T* const* wr, int64_t n, int64_t d, T scale, T* s) {
    constexpr int L = kLanes<T>;
    const int64_t d_main = d - d % L;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const T *w0 = wr[j], *w1 = wr[j + 1], *w2 = wr[j + 2], *w3 = wr[j + 3];
        alignas(64) T a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
        for (int64_t k = 0; k < d_main; k += L)
            for (int l = 0; l < L; ++l) {
                const T x = zi[k + l];
                a0[l] += x * w0[k + l];
                a1[l] += x * w1[k + l];
                a2[l] += x * w2[k + l];
                a3[l] += x * w3[k + l];
            }
        for (int64_t k = d_main; k < d; ++k) {
            const int l = int(k - d_main);
            a0[l] += zi[k] * w0[k];
            a1[l] += zi[k] * w1[k];
            a2[l] += zi[k] * w2[k];
            a3[l] += zi[k] * w3[k];
        }
        s[j] = fold_lanes(a0) * scale;
        s[j + 1] = fold_lanes(a1) * scale;
        s[j + 2] = fold_lanes(a2) * scale;
        s[j + 3] = fold_lanes(a3) * scale;
    }
    for (; j < n; ++j) {
        const T* w0 = wr[j];
        alignas(64) T a0[L] = {};
        for (int64_t k = 0; k < d_main; k += L)
            for (int l = 0; l < L; ++l) a0[l] += zi[k + l] * w0[k + l];
        for (int64_t k = d_main; k < d; ++k) a0[k - d_main] += zi[k] * w0[k];
        s[j] = fold_lanes(a0) * scale;
    }
}

// exp for x <= 0 in a form the compiler vectorises (libm's expf is a call per element,
// which cost more than the dot products at d = 64): x = k ln2 + r, |r| <= ln2/2, a
// degree-6 Taylor polynomial for e^r (error < 2e-7 relative, about 1 ulp) times 2^k
// built in the exponent bits. Rounding uses the 1.5 * 2^23 trick: no -ffast-math needed.
// Below e^-86 it returns 0 rather than a subnormal (subnormal arithmetic traps to
// microcode on x86 and made the backward several times slower on unnormalised features).
FASTMTL_INLINE float vexp(float x) {
    const float xc = std::max(x, -86.0f);
    const float k = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;
    const float r = (xc - k * 0.693145752f) - k * 1.42860677e-6f;  // ln2 split in two
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (int32_t(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, sizeof two_k);
    return x < -86.0f ? 0.0f : p * two_k;
}
FASTMTL_INLINE double vexp(double x) { return std::exp(x); }  // float64 is the exact path

// Logits of the rows order[b..e) into s (rows x n), then s -= row max and the row sums of
// e^s: the exps of a whole chunk in one flat loop, so they vectorise across rows.
template <typename T>
FASTMTL_INLINE void chunk_shifted_logits(const T* z, const T* const* wr, const int64_t* order,
                                         int64_t b, int64_t e, int64_t n, int64_t d, T scale,
                                         T* s, T* ex, T* lse) {
    const int64_t rows = e - b;
    for (int64_t r = 0; r < rows; ++r) {
        T* sr = s + r * n;
        row_logits(z + order[b + r] * d, wr, n, d, scale, sr);
        T m = sr[0];
        for (int64_t j = 1; j < n; ++j) m = std::max(m, sr[j]);
        for (int64_t j = 0; j < n; ++j) sr[j] -= m;
        lse[r] = m;
    }
#pragma omp simd
    for (int64_t q = 0; q < rows * n; ++q) ex[q] = vexp(s[q]);
    for (int64_t r = 0; r < rows; ++r) {
        T sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += ex[r * n + j];
        lse[r] = std::log(sum);  // of the shifted logits; the max is no longer needed
    }
}

template <typename T>
FASTMTL_INLINE double fwd_chunk_body(const T* z, const T* w, const int64_t* cls, const int64_t* y,
                                     const int64_t* order, int64_t b, int64_t e, int64_t n, int64_t d,
                                     T scale, const T** wr, T* s, T* ex, T* lse) {
    for (int64_t j = 0; j < n; ++j) wr[j] = w + cls[j] * d;
    chunk_shifted_logits(z, wr, order, b, e, n, d, scale, s, ex, lse);
    double loss = 0;
    for (int64_t r = 0; r < e - b; ++r) loss += double(lse[r] - s[r * n + y[order[b + r]]]);
    return loss;
}

// Gradients of a sub-block of rows: grad z rows = g (rows x n) . head (n x d), and
// slab (n x d) += g^T . z rows. Both run four operands per sweep, so each output vector
// is loaded and stored once per four products: one rank-1 slab update per sample would
// store the whole slab for every row, and that version was store bound.
template <typename T>
FASTMTL_INLINE void block_grads(const T* const* zr, const T* const* wr, const T* g, int64_t rows,
                                int64_t n, int64_t d, T* const* gzr, T* slab) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* gr = g + r * n;
        T* out = gzr[r];
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            const T g0 = gr[j], g1 = gr[j + 1], g2 = gr[j + 2], g3 = gr[j + 3];
            const T *w0 = wr[j], *w1 = wr[j + 1], *w2 = wr[j + 2], *w3 = wr[j + 3];
            const bool first = j == 0;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k)
                out[k] = (first ? T(0) : out[k]) + g0 * w0[k] + g1 * w1[k] + g2 * w2[k] + g3 * w3[k];
        }
        for (; j < n; ++j) {
            const T g0 = gr[j];
            const T* w0 = wr[j];
            const bool first = j == 0;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) out[k] = (first ? T(0) : out[k]) + g0 * w0[k];
        }
    }
    for (int64_t j = 0; j < n; ++j) {
        T* sj = slab + j * d;
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) {
            const T a0 = g[r * n + j], a1 = g[(r + 1) * n + j], a2 = g[(r + 2) * n + j],
                    a3 = g[(r + 3) * n + j];
            const T *z0 = zr[r], *z1 = zr[r + 1], *z2 = zr[r + 2], *z3 = zr[r + 3];
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) sj[k] += a0 * z0[k] + a1 * z1[k] + a2 * z2[k] + a3 * z3[k];
        }
        for (; r < rows; ++r) {
            const T a0 = g[r * n + j];
            const T* z0 = zr[r];
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) sj[k] += a0 * z0[k];
        }
    }
}

template <typename T>
FASTMTL_INLINE void bwd_chunk_body(const T* z, const T* w, const int64_t* cls, const int64_t* y,
                                   const int64_t* order, int64_t b, int64_t e, int64_t n, int64_t d,
                                   T scale, T coef, T* gz, T* slab, const T** wr, T* s, T* ex,
                                   T* lse) {
    for (int64_t j = 0; j < n; ++j) wr[j] = w + cls[j] * d;
    std::fill(slab, slab + n * d, T(0));
    // Sub-blocks of kSub rows: their z rows (kSub * d floats) are still in L1 when the
    // gradient loops read them a second time, while the exps still vectorise across rows.
    for (int64_t b0 = b; b0 < e; b0 += kSub) {
        const int64_t e0 = std::min(e, b0 + kSub), rows = e0 - b0;
        chunk_shifted_logits(z, wr, order, b0, e0, n, d, scale, s, ex, lse);
        // d loss_task / d (z_i . w_j) = grad_task / count * scale * (softmax_j - onehot_j)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < n; ++j) s[r * n + j] -= lse[r];
        // Probabilities below 2^-64 (float; 2^-600 in float64) are dropped: below the
        // precision of any term of size coef, and their products with z or w would be
        // subnormal (see vexp).
        const T tiny = sizeof(T) == 4 ? T(5.421011e-20) : T(2.4e-181);
#pragma omp simd
        for (int64_t q = 0; q < rows * n; ++q) {
            const T p = vexp(s[q]);
            ex[q] = p < tiny ? T(0) : coef * p;
        }
        for (int64_t r = 0; r < rows; ++r) ex[r * n + y[order[b0 + r]]] -= coef;
        const T* zr[kSub];
        T* gzr[kSub];
        for (int64_t r = 0; r < rows; ++r) {
            zr[r] = z + order[b0 + r] * d;
            gzr[r] = gz + order[b0 + r] * d;
        }
        block_grads(zr, wr, ex, rows, n, d, gzr, slab);
    }
}

// One clone set per dtype: target_clones wants plain (non-template) functions.
FASTMTL_CLONES double fwd_chunk_f32(const float* z, const float* w, const int64_t* cls,
                                    const int64_t* y, const int64_t* order, int64_t b, int64_t e,
                                    int64_t n, int64_t d, float scale, const float** wr, float* s,
                                    float* ex, float* lse) {
    return fwd_chunk_body(z, w, cls, y, order, b, e, n, d, scale, wr, s, ex, lse);
}
FASTMTL_CLONES double fwd_chunk_f64(const double* z, const double* w, const int64_t* cls,
                                    const int64_t* y, const int64_t* order, int64_t b, int64_t e,
                                    int64_t n, int64_t d, double scale, const double** wr, double* s,
                                    double* ex, double* lse) {
    return fwd_chunk_body(z, w, cls, y, order, b, e, n, d, scale, wr, s, ex, lse);
}
FASTMTL_CLONES void bwd_chunk_f32(const float* z, const float* w, const int64_t* cls,
                                  const int64_t* y, const int64_t* order, int64_t b, int64_t e,
                                  int64_t n, int64_t d, float scale, float coef, float* gz,
                                  float* slab, const float** wr, float* s, float* ex, float* lse) {
    bwd_chunk_body(z, w, cls, y, order, b, e, n, d, scale, coef, gz, slab, wr, s, ex, lse);
}
FASTMTL_CLONES void bwd_chunk_f64(const double* z, const double* w, const int64_t* cls,
                                  const int64_t* y, const int64_t* order, int64_t b, int64_t e,
                                  int64_t n, int64_t d, double scale, double coef, double* gz,
                                  double* slab, const double** wr, double* s, double* ex,
                                  double* lse) {
    bwd_chunk_body(z, w, cls, y, order, b, e, n, d, scale, coef, gz, slab, wr, s, ex, lse);
}
FASTMTL_INLINE double fwd_chunk(const float* z, const float* w, const int64_t* c, const int64_t* y,
                                const int64_t* o, int64_t b, int64_t e, int64_t n, int64_t d,
                                float sc, const float** wr, float* s, float* ex, float* lse) {
    return fwd_chunk_f32(z, w, c, y, o, b, e, n, d, sc, wr, s, ex, lse);
}
FASTMTL_INLINE double fwd_chunk(const double* z, const double* w, const int64_t* c, const int64_t* y,
                                const int64_t* o, int64_t b, int64_t e, int64_t n, int64_t d,
                                double sc, const double** wr, double* s, double* ex,
                                double* lse) {
    return fwd_chunk_f64(z, w, c, y, o, b, e, n, d, sc, wr, s, ex, lse);
}
FASTMTL_INLINE void bwd_chunk(const float* z, const float* w, const int64_t* c, const int64_t* y,
                              const int64_t* o, int64_t b, int64_t e, int64_t n, int64_t d, float sc,
                              float coef, float* gz, float* slab, const float** wr, float* s,
                              float* ex, float* lse) {
    bwd_chunk_f32(z, w, c, y, o, b, e, n, d, sc, coef, gz, slab, wr, s, ex, lse);
}
FASTMTL_INLINE void bwd_chunk(const double* z, const double* w, const int64_t* c, const int64_t* y,
                              const int64_t* o, int64_t b, int64_t e, int64_t n, int64_t d, double sc,
                              double coef, double* gz, double* slab, const double** wr, double* s,
                              double* ex, double* lse) {
    bwd_chunk_f64(z, w, c, y, o, b, e, n, d, sc, coef, gz, slab, wr, s, ex, lse);
}

template <typename T>
void forward_impl(const T* z, const T* w, const int64_t* tc, const int64_t* st, const int64_t* y,
                  int64_t N, int64_t d, int64_t C, int64_t T_, int64_t n, double scale, T* out,
                  bool mean, int nthreads) {
    const Plan p = make_plan(st, tc, y, N, T_, n, C);
    const int64_t n_chunks = int64_t(p.chunk_task.size());
    std::vector<double> chunk_loss(n_chunks);
#pragma omp parallel num_threads(threads_for(nthreads, N * n * d))
    {
        std::vector<const T*> wr(n);
        std::vector<T> s(kChunk * n), ex(kChunk * n), lse(kChunk);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < n_chunks; ++c)
            chunk_loss[c] = fwd_chunk(z, w, tc + p.chunk_task[c] * n, y, p.order.data(),
                                      p.chunk_begin[c], p.chunk_end[c], n, d, T(scale),
                                      wr.data(), s.data(), ex.data(), lse.data());
    }
    // Serial, in chunk order: the per-task sums do not depend on the thread count.
    std::vector<double> acc(T_, 0.0);
    for (int64_t c = 0; c < n_chunks; ++c) acc[p.chunk_task[c]] += chunk_loss[c];
    double total = 0;
    for (int64_t t = 0; t < T_; ++t) {
        const double task_loss = p.count[t] ? acc[t] / double(p.count[t]) : double(NAN);
        if (mean) total += task_loss;
        else out[t] = T(task_loss);
    }
    if (mean) out[0] = T(total / double(T_));
}

template <typename T>
void backward_impl(const T* z, const T* w, const int64_t* tc, const int64_t* st, const int64_t* y,
                   const T* grad_task, int64_t N, int64_t d, int64_t C, int64_t T_, int64_t n,
                   bool mean, double scale, T* gz, T* gw, T* work, int64_t work_len, int nthreads) {
    const Plan p = make_plan(st, tc, y, N, T_, n, C);
    const int64_t n_chunks = int64_t(p.chunk_task.size());
    if (n_chunks * n * d > work_len) throw std::length_error("workspace too small");
#pragma omp parallel num_threads(threads_for(nthreads, 3 * N * n * d))
    {
        std::vector<const T*> wr(n);
        std::vector<T> s(kChunk * n), ex(kChunk * n), lse(kChunk);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < n_chunks; ++c) {
            const int64_t t = p.chunk_task[c];
            // A 0-d upstream gradient is that of the mean over tasks: 1/T of it per task.
            const double g = mean ? double(grad_task[0]) / double(T_) : double(grad_task[t]);
            const double coef = g * scale / double(p.count[t]);
            bwd_chunk(z, w, tc + t * n, y, p.order.data(), p.chunk_begin[c], p.chunk_end[c], n, d,
                      T(scale), T(coef), gz, work + c * n * d, wr.data(), s.data(), ex.data(),
                      lse.data());
        }
    }
    // Slabs grouped by the class row they feed (counting sort, chunk-major within a class).
    std::vector<int64_t> start(C + 1, 0), slot(n_chunks * n);
    for (int64_t c = 0; c < n_chunks; ++c)
        for (int64_t j = 0; j < n; ++j) ++start[tc[p.chunk_task[c] * n + j] + 1];
    for (int64_t r = 0; r < C; ++r) start[r + 1] += start[r];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t c = 0; c < n_chunks; ++c)
        for (int64_t j = 0; j < n; ++j) slot[fill[tc[p.chunk_task[c] * n + j]]++] = c * n + j;
    const int64_t col_blocks = (d + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, n_chunks * n * d))
    for (int64_t item = 0; item < C * col_blocks; ++item) {
        const int64_t r = item / col_blocks, k0 = (item % col_blocks) * kColBlock;
        const int64_t k1 = std::min(d, k0 + kColBlock);
        T* out = gw + r * d;
        std::fill(out + k0, out + k1, T(0));
        for (int64_t q = start[r]; q < start[r + 1]; ++q) {
            const T* src = work + slot[q] * d;
#pragma omp simd
            for (int64_t k = k0; k < k1; ++k) out[k] += src[k];
        }
    }
}

// ---- pybind glue: validate buffers (dtype, C-contiguity, shape), never copy ----

template <typename T>
T* buf(py::array& a, const char* name, std::vector<int64_t> shape, bool writable = false) {
    if (!py::isinstance<py::array_t<T>>(a))
        throw py::value_error(std::string(name) + ": wrong dtype");
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + ": must be C-contiguous");
    if (a.ndim() != py::ssize_t(shape.size()))
        throw py::value_error(std::string(name) + ": wrong number of dimensions");
    for (size_t k = 0; k < shape.size(); ++k)
        if (shape[k] >= 0 && a.shape(k) != shape[k])
            throw py::value_error(std::string(name) + ": wrong shape");
    if (writable && !a.writeable()) throw py::value_error(std::string(name) + ": read-only");
    return static_cast<T*>(const_cast<void*>(a.data()));
}

int threads(int requested) {
#ifdef _OPENMP
    return requested > 0 ? requested : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

template <typename T>
void forward_typed(py::array z, py::array w, py::array tc, py::array st, py::array y, double scale,
                   py::array out, int nthreads) {
    const int64_t N = z.shape(0), d = z.shape(1), C = w.shape(0), T_ = tc.shape(0), n = tc.shape(1);
    const T* zp = buf<T>(z, "z", {N, d});
    const T* wp = buf<T>(w, "weight", {C, d});
    const int64_t* tcp = buf<int64_t>(tc, "task_classes", {T_, n});
    const int64_t* stp = buf<int64_t>(st, "sample_task", {N});
    const int64_t* yp = buf<int64_t>(y, "labels", {N});
    const bool mean = out.ndim() == 0;
    T* op = mean ? buf<T>(out, "out", {}, true) : buf<T>(out, "out", {T_}, true);
    py::gil_scoped_release nogil;
    forward_impl(zp, wp, tcp, stp, yp, N, d, C, T_, n, scale, op, mean, threads(nthreads));
}

template <typename T>
void backward_typed(py::array z, py::array w, py::array tc, py::array st, py::array y,
                    py::array grad_task, double scale, py::array gz, py::array gw, py::array work,
                    int nthreads) {
    const int64_t N = z.shape(0), d = z.shape(1), C = w.shape(0), T_ = tc.shape(0), n = tc.shape(1);
    const T* zp = buf<T>(z, "z", {N, d});
    const T* wp = buf<T>(w, "weight", {C, d});
    const int64_t* tcp = buf<int64_t>(tc, "task_classes", {T_, n});
    const int64_t* stp = buf<int64_t>(st, "sample_task", {N});
    const int64_t* yp = buf<int64_t>(y, "labels", {N});
    const bool mean = grad_task.ndim() == 0;
    const T* gtp = mean ? buf<T>(grad_task, "grad_task", {}) : buf<T>(grad_task, "grad_task", {T_});
    T* gzp = buf<T>(gz, "grad_z", {N, d}, true);
    T* gwp = buf<T>(gw, "grad_weight", {C, d}, true);
    T* wkp = buf<T>(work, "work", {-1}, true);
    const int64_t work_len = work.shape(0);
    py::gil_scoped_release nogil;
    backward_impl(zp, wp, tcp, stp, yp, gtp, N, d, C, T_, n, mean, scale, gzp, gwp, wkp, work_len,
                  threads(nthreads));
}

bool is_f32(const py::array& a) { return py::isinstance<py::array_t<float>>(a); }

void check_2d(const py::array& z, const py::array& w, const py::array& tc) {
    if (z.ndim() != 2 || w.ndim() != 2 || tc.ndim() != 2)
        throw py::value_error("z, weight and task_classes must be 2-D");
}

}  // namespace

PYBIND11_MODULE(_multihead_ce, m) {
    m.doc() = "CPU kernels of fastmtl.ops.multihead_ce (float32/float64, OpenMP)";
    m.attr("CHUNK") = kChunk;
    m.def(
        "check_indices",
        [](py::array tc, py::array st, py::array y, int64_t C) {
            if (tc.ndim() != 2) throw py::value_error("task_classes must be 2-D");
            const int64_t T_ = tc.shape(0), n = tc.shape(1), N = st.ndim() == 1 ? st.shape(0) : -1;
            const int64_t* tcp = buf<int64_t>(tc, "task_classes", {T_, n});
            const int64_t* stp = buf<int64_t>(st, "sample_task", {N});
            const int64_t* yp = buf<int64_t>(y, "labels", {N});
            check_and_count(stp, tcp, yp, N, T_, n, C, true);
        },
        py::arg("task_classes"), py::arg("sample_task"), py::arg("labels"), py::arg("n_classes"),
        "ValueError (naming the argument) unless task_classes lie in [0, n_classes), "
        "sample_task in [0, T), labels in [0, n) and every task has a sample.");
    m.def(
        "forward",
        [](py::array z, py::array w, py::array tc, py::array st, py::array y, double scale,
           py::array out, int nthreads) {
            check_2d(z, w, tc);
            if (is_f32(z)) forward_typed<float>(z, w, tc, st, y, scale, out, nthreads);
            else forward_typed<double>(z, w, tc, st, y, scale, out, nthreads);
        },
        py::arg("z"), py::arg("weight"), py::arg("task_classes"), py::arg("sample_task"),
        py::arg("labels"), py::arg("scale"), py::arg("out"), py::arg("num_threads") = 0,
        "Per-task mean cross-entropy into out (T,), or their mean into a 0-d out (NaN for a "
        "task without samples, as in the reference).");
    m.def(
        "backward",
        [](py::array z, py::array w, py::array tc, py::array st, py::array y, py::array grad_task,
           double scale, py::array gz, py::array gw, py::array work, int nthreads) {
            check_2d(z, w, tc);
            if (is_f32(z)) backward_typed<float>(z, w, tc, st, y, grad_task, scale, gz, gw, work, nthreads);
            else backward_typed<double>(z, w, tc, st, y, grad_task, scale, gz, gw, work, nthreads);
        },
        py::arg("z"), py::arg("weight"), py::arg("task_classes"), py::arg("sample_task"),
        py::arg("labels"), py::arg("grad_task"), py::arg("scale"), py::arg("grad_z"),
        py::arg("grad_weight"), py::arg("work"), py::arg("num_threads") = 0,
        "grad z (N, d) and grad weight (C, d) for upstream per-task gradients grad_task (T,), "
        "or a 0-d gradient of the mean over tasks; work needs (N // CHUNK + T) * n * d elements.");
}
