// Episode sampling and batch assembly for fastmtl (module fastmtl._episodes).
//
// The sampler implements, bit for bit, the counter-based algorithm documented in
// fastmtl/sampling.py (SplitMix64 words, partial Fisher-Yates shuffles); the numpy code
// there is the reference. Only pybind11 and numpy buffers are used, never torch's C++ API,
// so the module builds in pip's isolated build environment with any C++17 compiler.
//
// Every buffer is validated while the GIL is held; the work itself runs with the GIL
// released on plain std::threads (not OpenMP: torch ships its own OpenMP runtime, and two
// runtimes in one process oversubscribe the cores).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix(uint64_t x) {
  uint64_t z = x + kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t mulhi(uint64_t a, uint64_t b) {
#if defined(__SIZEOF_INT128__)
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#else
  const uint64_t a_lo = a & 0xFFFFFFFFu, a_hi = a >> 32, b_lo = b & 0xFFFFFFFFu, b_hi = b >> 32;
  const uint64_t ll = a_lo * b_lo, lh = a_lo * b_hi, hl = a_hi * b_lo, hh = a_hi * b_hi;
  const uint64_t mid = (ll >> 32) + (lh & 0xFFFFFFFFu) + (hl & 0xFFFFFFFFu);
  return hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
#endif
}

// Exact n % d for a fixed divisor by multiplication (Granlund & Montgomery 1994, fig. 4.1).
// A hardware 64-bit division costs several times more, and the divisors (class count minus
// i, class size minus i) are all known when the sampler is built.
struct FastMod {
  uint64_t d = 1, magic = 1;
  unsigned sh1 = 0, sh2 = 0;

  explicit FastMod(uint64_t divisor = 1) : d(divisor) {
    unsigned l = 0;  // ceil(log2(d))
    while (l < 64 && (uint64_t{1} << l) < d) ++l;
    // magic = floor((2**l - d) * 2**64 / d) + 1 by long division; 2**l - d < d.
    uint64_t rem = (l < 64 ? (uint64_t{1} << l) : 0) - d, q = 0;
    for (int bit = 0; bit < 64; ++bit) {
      const bool carry = rem >> 63;
      rem <<= 1;
      q <<= 1;
      if (carry || rem >= d) {
        rem -= d;
        q |= 1;
      }
    }
    magic = q + 1;
    sh1 = std::min(l, 1u);
    sh2 = l > 0 ? l - 1 : 0;
  }

  inline uint64_t mod(uint64_t n) const {
    const uint64_t t = mulhi(magic, n);
    return n - ((t + ((n - t) >> sh1)) >> sh2) * d;
  }
};

int clamp_threads(int requested, int64_t work_items, int64_t grain) {
  int hw = static_cast<int>(std::thread::hardware_concurrency());
  int n = requested > 0 ? requested : std::max(1, hw);
  // A thread costs tens of microseconds to start, and on a busy machine it may wait a time
  // slice (milliseconds) for a core: only jobs of about a millisecond or more are split.
  const int64_t useful = std::max<int64_t>(1, work_items / std::max<int64_t>(1, grain));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, useful)));
}

// f(lo, hi, worker) over [0, n) split into `threads` contiguous ranges. f must not throw:
// everything that can fail (allocation, validation) happens before the split.
template <class F>
void parallel_for(int64_t n, int threads, F&& f) {
  if (threads <= 1 || n <= 1) {
    f(int64_t{0}, n, 0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  const int64_t step = (n + threads - 1) / threads;
  for (int w = 1; w < threads; ++w) {
    const int64_t lo = std::min(n, w * step), hi = std::min(n, lo + step);
    try {
      pool.emplace_back([&f, lo, hi, w] { f(lo, hi, w); });
    } catch (const std::system_error&) {
      f(lo, hi, w);  // no thread to be had (process limit): do its share here
    }
  }
  f(int64_t{0}, std::min(n, step), 0);
  for (auto& t : pool) t.join();
}

void require_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be a C-contiguous array");
  }
}

// Equivalence, not identity, of dtypes: int64 is 'l' on Linux but 'q' on other platforms.
template <class T>
bool is_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    if (i + 1 < a.ndim() || a.ndim() == 1) s += ",";
    if (i + 1 < a.ndim()) s += " ";
  }
  return s + ")";
}

uint64_t to_u64(const py::handle& value, const char* name) {
  if (!PyLong_Check(value.ptr()) || PyBool_Check(value.ptr())) {
    throw py::value_error(std::string(name) + " must be an integer");
  }
  const unsigned long long v = PyLong_AsUnsignedLongLong(value.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + " must be an integer in [0, 2**64), got " +
                          py::str(value).cast<std::string>());
  }
  return static_cast<uint64_t>(v);
}

class Sampler {
 public:
  Sampler(const py::array& labels, int64_t n_way, int64_t k_shot, int64_t n_query,
           const py::object& seed) {
    if (labels.ndim() != 1) {
      throw py::value_error("labels must be a 1-D array, got shape " + shape_str(labels));
    }
    if (!is_dtype<int64_t>(labels)) {
      throw py::value_error("labels must be an int64 array, got dtype " +
                            py::str(labels.dtype()).cast<std::string>());
    }
    require_contiguous(labels, "labels");
    if (n_way < 1) throw py::value_error("n_way must be >= 1, got " + std::to_string(n_way));
    if (k_shot < 1) throw py::value_error("k_shot must be >= 1, got " + std::to_string(k_shot));
    if (n_query < 0) {
      throw py::value_error("n_query must be >= 0, got " + std::to_string(n_query));
    }
    seed_ = to_u64(seed, "seed");
    seed_key_ = mix(seed_);
    n_way_ = n_way;
    k_shot_ = k_shot;
    n_query_ = n_query;
    shots_ = k_shot + n_query;

    const int64_t n = labels.shape(0);
    const int64_t* lab = static_cast<const int64_t*>(labels.data());
    classes_.assign(lab, lab + n);
    std::sort(classes_.begin(), classes_.end());
    classes_.erase(std::unique(classes_.begin(), classes_.end()), classes_.end());
    const int64_t n_classes = static_cast<int64_t>(classes_.size());
    if (n_way > n_classes) {
      throw py::value_error("n_way=" + std::to_string(n_way) +
                            " is larger than the number of classes (" +
                            std::to_string(n_classes) + ")");
    }

    // Class positions, then a stable counting sort: images of a class in dataset order.
    std::vector<int64_t> pos(n);
    counts_.assign(n_classes, 0);
    for (int64_t i = 0; i < n; ++i) {
      pos[i] = std::lower_bound(classes_.begin(), classes_.end(), lab[i]) - classes_.begin();
      ++counts_[pos[i]];
    }
    int64_t smallest = 0;
    for (int64_t c = 1; c < n_classes; ++c) {
      if (counts_[c] < counts_[smallest]) smallest = c;
    }
    if (n_classes && counts_[smallest] < shots_) {
      throw py::value_error("k_shot + n_query = " + std::to_string(shots_) +
                            " is larger than class " + std::to_string(classes_[smallest]) +
                            ", which has " + std::to_string(counts_[smallest]) + " images");
    }
    offsets_.assign(n_classes + 1, 0);
    for (int64_t c = 0; c < n_classes; ++c) offsets_[c + 1] = offsets_[c] + counts_[c];
    order_.resize(n);
    std::vector<int64_t> fill(offsets_.begin(), offsets_.end() - 1);
    for (int64_t i = 0; i < n; ++i) order_[fill[pos[i]]++] = i;
    max_count_ = n_classes ? *std::max_element(counts_.begin(), counts_.end()) : 0;

    class_mod_.reserve(n_way);
    for (int64_t i = 0; i < n_way; ++i) class_mod_.emplace_back(n_classes - i);
    image_mod_.reserve(n_classes * shots_);
    for (int64_t c = 0; c < n_classes; ++c) {
      for (int64_t i = 0; i < shots_; ++i) image_mod_.emplace_back(counts_[c] - i);
    }
  }

  py::tuple sample(const py::object& start_obj, int64_t count, int num_threads) const {
    const uint64_t start = to_u64(start_obj, "start");
    if (count < 0) throw py::value_error("count must be >= 0, got " + std::to_string(count));
    if (count > 0 && start + static_cast<uint64_t>(count - 1) < start) {
      throw py::value_error("episode numbers must stay below 2**64");
    }
    py::array_t<int64_t> cls({count, n_way_});
    py::array_t<int64_t> idx({count, n_way_, shots_});
    int64_t* cls_p = cls.mutable_data();
    int64_t* idx_p = idx.mutable_data();
    const int threads = clamp_threads(num_threads, count, 4096);
    // Per-worker scratch: identity permutations that each episode disturbs and restores,
    // so an episode costs O(n_way * shots), never O(classes + class size).
    const int64_t n_classes = static_cast<int64_t>(classes_.size());
    std::vector<std::vector<int64_t>> scratch(threads);
    for (auto& s : scratch) {
      s.resize(n_classes + max_count_ + std::max(n_way_, shots_));
      for (int64_t c = 0; c < n_classes; ++c) s[c] = c;
      for (int64_t i = 0; i < max_count_; ++i) s[n_classes + i] = i;
    }
    {
      py::gil_scoped_release release;
      parallel_for(count, threads, [&](int64_t lo, int64_t hi, int w) {
        int64_t* perm = scratch[w].data();
        int64_t* slots = perm + n_classes;
        int64_t* touched = slots + max_count_;
        for (int64_t e = lo; e < hi; ++e) {
          draw_episode(start + static_cast<uint64_t>(e), cls_p + e * n_way_,
                   idx_p + e * n_way_ * shots_, perm, slots, touched);
        }
      });
    }
    return py::make_tuple(std::move(cls), std::move(idx));
  }

  py::array_t<int64_t> classes() const { return to_array(classes_); }
  py::array_t<int64_t> counts() const { return to_array(counts_); }
  py::array_t<int64_t> offsets() const { return to_array(offsets_); }
  py::array_t<int64_t> order() const { return to_array(order_); }

 private:
  static py::array_t<int64_t> to_array(const std::vector<int64_t>& v) {
    py::array_t<int64_t> out(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), out.mutable_data());
    return out;
  }

  // Locals throughout: the int64 stores into the outputs could alias the members, which
  // would make the compiler reload them on every step.
  void draw_episode(uint64_t e, int64_t* cls_out, int64_t* idx_out, int64_t* perm,
                int64_t* slots, int64_t* touched) const {
    const int64_t n_way = n_way_, shots = shots_;
    const uint64_t key = mix(seed_key_ ^ e);
    const FastMod* class_mod = class_mod_.data();
    for (int64_t i = 0; i < n_way; ++i) {
      const uint64_t u = mix(key + static_cast<uint64_t>(i) * kGolden);
      const int64_t j = i + static_cast<int64_t>(class_mod[i].mod(u));
      cls_out[i] = perm[j];  // position i is final once step i has run: no write back
      perm[j] = perm[i];
      touched[i] = j;
    }
    // cls_out holds class positions until each slot below swaps in the label value.
    for (int64_t i = 0; i < n_way; ++i) {
      perm[touched[i]] = touched[i];
      perm[i] = i;
    }

    const FastMod* image_mod = image_mod_.data();
    const int64_t* order = order_.data();
    const int64_t* offsets = offsets_.data();
    const int64_t* classes = classes_.data();
    for (int64_t w = 0; w < n_way; ++w) {
      const int64_t c = cls_out[w];
      const FastMod* mods = image_mod + c * shots;
      const int64_t* members = order + offsets[c];
      const uint64_t base = static_cast<uint64_t>(n_way + w * shots);
      int64_t* out = idx_out + w * shots;
      for (int64_t i = 0; i < shots; ++i) {
        const uint64_t u = mix(key + (base + static_cast<uint64_t>(i)) * kGolden);
        const int64_t j = i + static_cast<int64_t>(mods[i].mod(u));
        const int64_t picked = slots[j];
        slots[j] = slots[i];
        touched[i] = j;
        out[i] = members[picked];  // position i is final once step i has run
      }
      for (int64_t i = 0; i < shots; ++i) {
        slots[touched[i]] = touched[i];
        slots[i] = i;
      }
      cls_out[w] = classes[c];
    }
  }

  uint64_t seed_ = 0, seed_key_ = 0;
  int64_t n_way_ = 0, k_shot_ = 0, n_query_ = 0, shots_ = 0, max_count_ = 0;
  std::vector<int64_t> classes_, counts_, offsets_, order_;
  std::vector<FastMod> class_mod_, image_mod_;
};

// --- batch assembly ----------------------------------------------------------------------

// Deinterleaving bytes vectorizes only with byte shuffles (SSSE3 and up), which the portable
// baseline (SSE2) lacks; on Linux/x86-64 the compiler also emits SSSE3 and AVX2 copies and
// the loader picks the best one the CPU has.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define FASTMTL_CLONES __attribute__((target_clones("avx2", "ssse3", "default")))
#else
#define FASTMTL_CLONES
#endif

FASTMTL_CLONES
void deinterleave3(const uint8_t* __restrict src, uint8_t* __restrict d0,
                    uint8_t* __restrict d1, uint8_t* __restrict d2, int64_t hw) {
  for (int64_t p = 0; p < hw; ++p) {
    d0[p] = src[3 * p];
    d1[p] = src[3 * p + 1];
    d2[p] = src[3 * p + 2];
  }
}

void copy_planar_u8(const uint8_t* src, uint8_t* dst, int64_t hw, int64_t ch) {
  if (ch == 1) {
    std::memcpy(dst, src, static_cast<size_t>(hw));
    return;
  }
  if (ch == 3) {
    deinterleave3(src, dst, dst + hw, dst + 2 * hw, hw);
    return;
  }
  for (int64_t p = 0; p < hw; ++p) {
    for (int64_t c = 0; c < ch; ++c) dst[c * hw + p] = src[p * ch + c];
  }
}

// lut[c * 256 + v] is the normalized value of byte v in channel c, computed in Python with
// the same float32 operations as FewShotDataset.tensor, so both give identical floats.
void copy_planar_f32(const uint8_t* src, float* dst, int64_t hw, int64_t ch, const float* lut) {
  if (ch == 1) {
    for (int64_t p = 0; p < hw; ++p) dst[p] = lut[src[p]];
    return;
  }
  if (ch == 3) {
    float* d0 = dst;
    float* d1 = dst + hw;
    float* d2 = dst + 2 * hw;
    const float* l0 = lut;
    const float* l1 = lut + 256;
    const float* l2 = lut + 512;
    for (int64_t p = 0; p < hw; ++p) {
      d0[p] = l0[src[3 * p]];
      d1[p] = l1[src[3 * p + 1]];
      d2[p] = l2[src[3 * p + 2]];
    }
    return;
  }
  for (int64_t p = 0; p < hw; ++p) {
    for (int64_t c = 0; c < ch; ++c) dst[c * hw + p] = lut[c * 256 + src[p * ch + c]];
  }
}

void assemble(const py::array& images, const py::array& index, const py::array& out,
              const py::object& lut_obj, int num_threads) {
  if (!is_dtype<uint8_t>(images) || (images.ndim() != 3 && images.ndim() != 4)) {
    throw py::value_error("images must be a uint8 array (N, H, W[, C]), got dtype " +
                          py::str(images.dtype()).cast<std::string>() + " with shape " +
                          shape_str(images));
  }
  require_contiguous(images, "images");
  if (!is_dtype<int64_t>(index)) {
    throw py::value_error("index must be an int64 array, got dtype " +
                          py::str(index.dtype()).cast<std::string>());
  }
  require_contiguous(index, "index");
  require_contiguous(out, "out");
  const bool as_float = is_dtype<float>(out);
  if (!as_float && !is_dtype<uint8_t>(out)) {
    throw py::value_error("out must be a float32 or uint8 array, got dtype " +
                          py::str(out.dtype()).cast<std::string>());
  }

  const int64_t n = images.shape(0), h = images.shape(1), w = images.shape(2);
  const int64_t ch = images.ndim() == 4 ? images.shape(3) : 1;
  const int64_t hw = h * w, image_bytes = hw * ch;
  const int64_t count = index.size();
  bool shape_ok = out.ndim() == index.ndim() + 3;
  for (py::ssize_t i = 0; shape_ok && i < index.ndim(); ++i) shape_ok = out.shape(i) == index.shape(i);
  if (shape_ok) {
    const py::ssize_t k = index.ndim();
    shape_ok = out.shape(k) == ch && out.shape(k + 1) == h && out.shape(k + 2) == w;
  }
  if (!shape_ok) {
    throw py::value_error("out must have shape index.shape + (C, H, W) = " + shape_str(index) +
                          " + (" + std::to_string(ch) + ", " + std::to_string(h) + ", " +
                          std::to_string(w) + "), got " + shape_str(out));
  }

  const float* lut = nullptr;
  if (as_float) {
    if (lut_obj.is_none()) throw py::value_error("a float32 out needs a lookup table");
    py::array lut_arr = py::reinterpret_borrow<py::array>(lut_obj);
    if (!is_dtype<float>(lut_arr) || lut_arr.ndim() != 2 || lut_arr.shape(0) != ch ||
        lut_arr.shape(1) != 256) {
      throw py::value_error("lut must be a float32 array of shape (" + std::to_string(ch) +
                            ", 256)");
    }
    require_contiguous(lut_arr, "lut");
    lut = static_cast<const float*>(lut_arr.data());
  } else if (!lut_obj.is_none()) {
    throw py::value_error("a uint8 out takes no lookup table (no normalization)");
  }

  const int64_t* idx = static_cast<const int64_t*>(index.data());
  for (int64_t i = 0; i < count; ++i) {
    if (idx[i] < 0 || idx[i] >= n) {
      throw py::value_error("index " + std::to_string(idx[i]) + " is out of range for " +
                            std::to_string(n) + " images");
    }
  }
  const uint8_t* src = static_cast<const uint8_t*>(images.data());
  void* dst = const_cast<void*>(out.data());
  if (!out.writeable()) throw py::value_error("out must be writeable");
  const int threads = clamp_threads(num_threads, count * image_bytes, 4 << 20);

  py::gil_scoped_release release;
  parallel_for(count, threads, [&](int64_t lo, int64_t hi, int) {
    for (int64_t b = lo; b < hi; ++b) {
      const uint8_t* s = src + idx[b] * image_bytes;
      if (as_float) {
        copy_planar_f32(s, static_cast<float*>(dst) + b * image_bytes, hw, ch, lut);
      } else {
        copy_planar_u8(s, static_cast<uint8_t*>(dst) + b * image_bytes, hw, ch);
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(_episodes, m) {
  m.doc() = "C++ core of fastmtl.sampling: counter-based episode sampling, batch assembly.";

  py::class_<Sampler>(m, "Sampler")
      .def(py::init<const py::array&, int64_t, int64_t, int64_t, const py::object&>(),
           py::arg("labels"), py::arg("n_way"), py::arg("k_shot"), py::arg("n_query"),
           py::arg("seed"),
           "Index the int64 label array once; episodes are a pure function of (seed, number).")
      .def("sample", &Sampler::sample, py::arg("start"), py::arg("count"),
           py::arg("num_threads") = 0,
           "Episodes start..start+count-1: (classes (count, n_way), index (count, n_way, "
           "k_shot + n_query)), both int64.")
      .def_property_readonly("classes", &Sampler::classes)
      .def_property_readonly("counts", &Sampler::counts)
      .def_property_readonly("offsets", &Sampler::offsets)
      .def_property_readonly("order", &Sampler::order);

  m.def("assemble", &assemble, py::arg("images"), py::arg("index"), py::arg("out"),
        py::arg("lut") = py::none(), py::arg("num_threads") = 0,
        "Gather images[index] into out (index.shape + (C, H, W)), channels first; a float32 "
        "out maps each byte through lut (C, 256).");
}
