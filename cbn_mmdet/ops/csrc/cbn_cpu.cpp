// CBN's per-step bookkeeping on CPU as single passes over the channels.
//
// Each function computes exactly what its Python counterpart in cbn_mmdet/ops/statistics.py and
// cbn_mmdet/models/window_history.py computes (the same formulas, in the same order), but in one
// loop instead of one dispatched tensor operation per formula line. The Python code stays the
// reference: tests compare the two in float64. Layouts are those of window_history.py: the ring's
// statistics block is channel-major, (4C + 3, T): mean, var (C rows each), count, present,
// compensable, then mean_ref, var_ref (C rows each).
#include "cbn_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "cbn_mmdet fused CPU op: ", name, " must be on the CPU");
}

template <typename T>
T* data_of(const Tensor& t) { return t.data_ptr<T>(); }

// Σ_j a[j]·b[j] with sixteen partial sums (so that the compiler vectorises it, as BLAS would sum),
// compiled for the CPU's widest vectors (chosen when the library loads)
template <typename T, typename U>
inline T dot_impl(const T* a, const U* b, int64_t n) {
  T acc[16] = {0};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * static_cast<T>(b[j + l]);
  }
  T total = 0;
  for (int l = 0; l < 16; ++l) total += acc[l];
  for (; j < n; ++j) total += a[j] * static_cast<T>(b[j]);
  return total;
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CBN_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CBN_VECTOR_CLONES
#endif

CBN_VECTOR_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }
CBN_VECTOR_CLONES double dot(const double* a, const double* b, int64_t n) {
  return dot_impl(a, b, n);
}
// with a bfloat16 history (history_dtype='bfloat16'), widened as it is read
CBN_VECTOR_CLONES float dot(const float* a, const c10::BFloat16* b, int64_t n) {
  return dot_impl(a, b, n);
}
CBN_VECTOR_CLONES double dot(const double* a, const c10::BFloat16* b, int64_t n) {
  return dot_impl(a, b, n);
}

// (Σ a·p, Σ a·g) in one pass over a, each summed as dot() sums it (sixteen partial sums, added in
// order, so the same bits): a row of θ loaded once for an entry's patch and ∂var/∂θ row. Written
// with vector types because the compiler does not vectorise the two sums of dot_impl's form.
#if defined(__GNUC__) || defined(__clang__)
template <typename T>
inline void dot2_impl(const T* a, const T* p, const T* g, int64_t n, T* ap, T* ag) {
  constexpr int kLanes = 32 / sizeof(T), kVectors = 16 / kLanes;
  typedef T vec __attribute__((vector_size(32)));
  vec accp[kVectors] = {}, accg[kVectors] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int v = 0; v < kVectors; ++v) {
      vec av, pv, gv;  // (unaligned loads)
      __builtin_memcpy(&av, a + j + v * kLanes, sizeof(vec));
      __builtin_memcpy(&pv, p + j + v * kLanes, sizeof(vec));
      __builtin_memcpy(&gv, g + j + v * kLanes, sizeof(vec));
      accp[v] += av * pv;
      accg[v] += av * gv;
    }
  }
  T tp = 0, tg = 0;
  for (int v = 0; v < kVectors; ++v) {
    for (int l = 0; l < kLanes; ++l) {
      tp += accp[v][l];
      tg += accg[v][l];
    }
  }
  for (; j < n; ++j) {
    tp += a[j] * p[j];
    tg += a[j] * g[j];
  }
  *ap = tp;
  *ag = tg;
}
CBN_VECTOR_CLONES void dot2(const float* a, const float* p, const float* g, int64_t n, float* ap,
                            float* ag) {
  dot2_impl(a, p, g, n, ap, ag);
}
CBN_VECTOR_CLONES void dot2(const double* a, const double* p, const double* g, int64_t n,
                            double* ap, double* ag) {
  dot2_impl(a, p, g, n, ap, ag);
}
#endif
// two passes: a bfloat16 history (widened as it is read), and every type without vector types
// (the overloads above are exact matches, so they win where they exist)
template <typename T, typename U>
void dot2(const T* a, const T* p, const U* g, int64_t n, T* ap, T* ag) {
  *ap = dot(a, p, n);
  *ag = dot(a, g, n);
}

// The normalisation's per-plane loops, compiled for the widest vectors like dot(): y = x·a + b;
// (Σ g, Σ g·(x − c)) with sixteen partial sums; dx = a·g + b·(x − c) + d.
template <typename T>
inline void scale_shift_impl(const T* x, T* y, int64_t n, T a, T b) {
  for (int64_t j = 0; j < n; ++j) y[j] = x[j] * a + b;
}
template <typename T>
inline void grad_sums_impl(const T* g, const T* x, int64_t n, T centre, T* sum_g, T* sum_gx) {
  T acc_g[16] = {0}, acc_gx[16] = {0};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int l = 0; l < 16; ++l) {
      acc_g[l] += g[j + l];
      acc_gx[l] += g[j + l] * (x[j + l] - centre);
    }
  }
  T total_g = 0, total_gx = 0;
  for (int l = 0; l < 16; ++l) {
    total_g += acc_g[l];
    total_gx += acc_gx[l];
  }
  for (; j < n; ++j) {
    total_g += g[j];
    total_gx += g[j] * (x[j] - centre);
  }
  *sum_g = total_g;
  *sum_gx = total_gx;
}
template <typename T>
inline void grad_input_impl(const T* g, const T* x, T* out, int64_t n, T centre, T a, T b, T d) {
  for (int64_t j = 0; j < n; ++j) out[j] = a * g[j] + b * (x[j] - centre) + d;
}
#define CBN_NORM_KERNELS(T)                                                                      \
  CBN_VECTOR_CLONES void scale_shift(const T* x, T* y, int64_t n, T a, T b) {                    \
    scale_shift_impl(x, y, n, a, b);                                                             \
  }                                                                                              \
  CBN_VECTOR_CLONES void grad_sums(const T* g, const T* x, int64_t n, T centre, T* sum_g,        \
                                   T* sum_gx) {                                                  \
    grad_sums_impl(g, x, n, centre, sum_g, sum_gx);                                              \
  }                                                                                              \
  CBN_VECTOR_CLONES void grad_input(const T* g, const T* x, T* out, int64_t n, T centre, T a,    \
                                    T b, T d) {                                                  \
    grad_input_impl(g, x, out, n, centre, a, b, d);                                              \
  }
CBN_NORM_KERNELS(float)
CBN_NORM_KERNELS(double)
#undef CBN_NORM_KERNELS

// dispatch on the ring's gradient storage: the statistics' dtype or bfloat16
template <typename scalar_t, typename F>
void with_grad_type(const Tensor& grads, F&& body) {
  if (grads.scalar_type() == at::kBFloat16) {
    body(static_cast<c10::BFloat16*>(nullptr));
  } else {
    TORCH_CHECK(grads.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value,
                "the ring's gradients must be in the statistics' dtype or bfloat16");
    body(static_cast<scalar_t*>(nullptr));
  }
}

// The record of a new entry over one slot of the ring: its statistics, the reference terms
// <∂μ/∂θ, θ> + b and <∂var/∂θ, θ> (Eqs. 7-8 at the recording weights) and its gradients; an entry
// whose terms are not finite is kept uncompensated, nothing of a non-finite batch is kept. Written
// per channel (row) and then the rest (finish), so that past_window can write a channel's row in
// the pass that has just read that channel's entries.
template <typename scalar_t>
class EntryWriter {
 public:
  EntryWriter(const Tensor& stats, const cbn_mmdet::NewEntry& entry,
              const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
              int64_t groups, const c10::optional<Tensor>& grads)
      : entry_(entry), c_((stats.size(0) - 3) / 4), slots_(stats.size(1)) {
    TORCH_CHECK(entry.slot >= 0 && entry.slot < slots_, "slot out of range");
    bm_c_ = entry.batch_mean.to(stats.scalar_type()).contiguous();
    bv_c_ = entry.batch_var.to(stats.scalar_type()).contiguous();
    gradients_ = entry.patch.has_value() && entry.patch->defined();
    if (!gradients_) return;
    TORCH_CHECK(weight.has_value() && weight->scalar_type() == stats.scalar_type(),
                "the weight must be in the statistics' dtype");
    TORCH_CHECK(grads.has_value() && grads->defined() && grads->is_contiguous(),
                "the ring's gradients must be contiguous");
    p_c_ = entry.patch->to(stats.scalar_type()).contiguous();
    g_c_ = entry.var_grad->to(stats.scalar_type()).contiguous();
    w_c_ = weight->contiguous();
    d_ = g_c_.numel() / c_;  // C_in/G · kh · kw
    per_group_ = c_ / groups;
    if (bias.has_value() && bias->defined()) b_ = bias->to(stats.scalar_type()).contiguous();
    // ∂var/∂θ = scale · product − 2 μ ⊗ patch, formed as it is written into the ring
    if (entry.centre_mean.has_value() && entry.centre_mean->defined()) {
      cm_ = entry.centre_mean->to(stats.scalar_type()).contiguous();
      cp_ = entry.centre_patch->to(stats.scalar_type()).contiguous();
    }
    refs_.assign(2 * c_, scalar_t(0));
  }

  bool has_gradients() const { return gradients_; }

  // finite_flag of the batch's variance (window_step's: one sum)
  bool batch_finite() const {
    const scalar_t* bv = data_of<scalar_t>(bv_c_);
    scalar_t total = 0;
    for (int64_t ch = 0; ch < c_; ++ch) total += bv[ch];
    return (total - total) == scalar_t(0);
  }

  // channel ch's row of ∂var/∂θ, rounded to the ring's storage, and its references (from the
  // stored values)
  template <typename grad_t>
  void row(int64_t ch, grad_t* ring) {
    const scalar_t* th = data_of<scalar_t>(w_c_) + ch * d_;
    const scalar_t* gr = data_of<scalar_t>(g_c_) + ch * d_;
    grad_t* dst = ring + (ch * slots_ + entry_.slot) * d_;  // (zeroed by finish if not usable)
    const scalar_t sc = static_cast<scalar_t>(entry_.scale);
    if (cm_.defined()) {
      const scalar_t twice_mean = scalar_t(2) * data_of<scalar_t>(cm_)[ch];
      const scalar_t* cq = data_of<scalar_t>(cp_) + (ch / per_group_) * d_;
      for (int64_t j = 0; j < d_; ++j) dst[j] = static_cast<grad_t>(sc * gr[j] - twice_mean * cq[j]);
    } else if (sc != scalar_t(1)) {
      for (int64_t j = 0; j < d_; ++j) dst[j] = static_cast<grad_t>(sc * gr[j]);
    } else {
      for (int64_t j = 0; j < d_; ++j) dst[j] = static_cast<grad_t>(gr[j]);
    }
    const scalar_t bias = b_.defined() ? data_of<scalar_t>(b_)[ch] : scalar_t(0);
    dot2(th, data_of<scalar_t>(p_c_) + (ch / per_group_) * d_, dst, d_, &refs_[ch], &refs_[c_ + ch]);
    refs_[ch] += bias;
  }

  // every channel's row (when no pass over the past writes them)
  void rows(const Tensor& grads) {
    with_grad_type<scalar_t>(grads, [&](auto* type) {
      using grad_t = std::remove_pointer_t<decltype(type)>;
      grad_t* ring = static_cast<grad_t*>(grads.data_ptr());
      at::parallel_for(0, c_, 8, [&](int64_t begin, int64_t end) {
        for (int64_t ch = begin; ch < end; ++ch) row(ch, ring);
      });
    });
  }

  // the entry's statistics and references, its patch, the zeroed gradients of an entry kept
  // uncompensated, the tensor cursor [slot, filled]
  void finish(const Tensor& stats, bool batch_finite, const c10::optional<Tensor>& patches,
              const c10::optional<Tensor>& grads) {
    const scalar_t* bm = data_of<scalar_t>(bm_c_);
    const scalar_t* bv = data_of<scalar_t>(bv_c_);
    bool usable = false;
    if (gradients_) {
      // finite_flag of the whole entry: one sum
      scalar_t total = static_cast<scalar_t>(entry_.count) + scalar_t(2);
      for (int64_t ch = 0; ch < c_; ++ch) total += bm[ch] + bv[ch];
      for (scalar_t r : refs_) total += r;
      usable = (total - total) == scalar_t(0);
    }
    const bool plain = batch_finite;
    scalar_t* s = data_of<scalar_t>(stats);
    const int64_t c = c_, slots = slots_, slot = entry_.slot;
    auto put = [&](int64_t row, scalar_t value) { s[row * slots + slot] = value; };
    for (int64_t ch = 0; ch < c; ++ch) {
      put(ch, (usable || plain) ? bm[ch] : scalar_t(0));
      put(c + ch, (usable || plain) ? bv[ch] : scalar_t(0));
      put(2 * c + 3 + ch, usable ? refs_[ch] : scalar_t(0));
      put(3 * c + 3 + ch, usable ? refs_[c + ch] : scalar_t(0));
    }
    put(2 * c, (usable || plain) ? static_cast<scalar_t>(entry_.count) : scalar_t(0));
    put(2 * c + 1, (usable || plain) ? scalar_t(1) : scalar_t(0));
    put(2 * c + 2, usable ? scalar_t(1) : scalar_t(0));
    if (grads.has_value() && grads->defined()) {
      // the ring's gradients (C, T, D) and patches (T, C_in, kh, kw): zero where not usable (an
      // entry recorded without a conv, too: the compensation of an entry uses no mask)
      TORCH_CHECK(grads->is_contiguous() && patches->is_contiguous(), "ring must be contiguous");
      if (!usable) {  // (written by row() when usable)
        grads->select(1, slot).zero_();
      }
      const int64_t pn = patches->numel() / slots;
      scalar_t* pdst = data_of<scalar_t>(*patches) + slot * pn;
      const scalar_t* psrc = usable ? data_of<scalar_t>(p_c_) : nullptr;
      if (usable) std::copy(psrc, psrc + pn, pdst); else std::fill(pdst, pdst + pn, scalar_t(0));
    }
    int64_t* cur = entry_.cursor.data_ptr<int64_t>();
    cur[0] = slot;
    cur[1] = entry_.filled;
  }

 private:
  const cbn_mmdet::NewEntry& entry_;
  const int64_t c_, slots_;
  Tensor bm_c_, bv_c_, p_c_, g_c_, w_c_, b_, cm_, cp_;
  int64_t d_ = 0, per_group_ = 1;
  bool gradients_ = false;
  std::vector<scalar_t> refs_;
};

}  // namespace

namespace cbn_mmdet {

// Eqs. 7, 8, 10 for the ring's entries at the current weights θ (C, C_in/G·K): per channel the
// inner products of its row of θ with every entry's ∂μ/∂θ patch and ∂var/∂θ row (one pass over θ
// and the gradients), minus the references; the shift and the clamp. Also the window's weights (in
// the window and holding values) and a copy of the recorded rows. Without θ: the entries as
// recorded (Naive CBN, or nothing to compensate with).
std::tuple<Tensor, Tensor, Tensor, Tensor> past_window(
    const Tensor& stats, const Tensor& in_window, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& patches, const c10::optional<Tensor>& grads,
    const c10::optional<Tensor>& bias, int64_t groups, bool clamp) {
  Tensor window = in_window.to(at::kDouble).contiguous();
  const double* in = window.data_ptr<double>();
  return past_window(stats, std::vector<double>(in, in + window.numel()), weight, patches, grads,
                     bias, groups, clamp);
}

// With `record`, that entry is also written over its slot in the same pass, each channel's row
// right after the channel's entries were read (θ's row and the slot's row are then read once
// for both): the same values as past_window followed by record_entry.
std::tuple<Tensor, Tensor, Tensor, Tensor> past_window(
    const Tensor& stats, const std::vector<double>& in_window,
    const c10::optional<Tensor>& weight, const c10::optional<Tensor>& patches,
    const c10::optional<Tensor>& grads, const c10::optional<Tensor>& bias, int64_t groups,
    bool clamp, const NewEntry* record) {
  check_cpu(stats, "stats");
  TORCH_CHECK(stats.is_contiguous() && stats.dim() == 2, "stats must be a contiguous (4C + 3, T)");
  const int64_t rows = stats.size(0), slots = stats.size(1), c = (rows - 3) / 4;
  TORCH_CHECK(static_cast<int64_t>(in_window.size()) == slots, "one window weight per slot");
  Tensor valid = at::empty({slots}, stats.options());
  // the recorded rows, copied (the ring's oldest slot may be overwritten next)
  Tensor recorded = at::empty({2 * c + 1, slots}, stats.options());
  std::memcpy(recorded.data_ptr(), stats.data_ptr(), recorded.nbytes());
  const bool compensate = weight.has_value() && weight->defined();
  Tensor mean_out = compensate ? at::empty({c, slots}, stats.options()) : recorded.narrow(0, 0, c);
  Tensor var_out = compensate ? at::empty({c, slots}, stats.options()) : recorded.narrow(0, c, c);
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "past_window", [&] {
    c10::optional<EntryWriter<scalar_t>> writer;
    if (record != nullptr) writer.emplace(stats, *record, weight, bias, groups, grads);
    const bool write_rows = writer.has_value() && writer->has_gradients();
    const scalar_t* s = data_of<scalar_t>(stats);
    scalar_t* w = data_of<scalar_t>(valid);
    const scalar_t* present = s + (2 * c + 1) * slots;
    for (int64_t t = 0; t < slots; ++t) w[t] = static_cast<scalar_t>(in_window[t]) * present[t];
    if (compensate) {
      TORCH_CHECK(grads->is_contiguous() && patches->is_contiguous(), "the ring must be contiguous");
      Tensor th_c = weight->to(stats.scalar_type()).contiguous();
      const int64_t d = th_c.numel() / c;  // C_in/G · kh · kw
      const int64_t per_group = c / groups, patch_size = patches->numel() / slots;
      const scalar_t* th = data_of<scalar_t>(th_c);
      const scalar_t* p = data_of<scalar_t>(*patches);   // (T, C_in·K)
      const scalar_t* mean = s;
      const scalar_t* var = s + c * slots;
      const scalar_t* compensable = s + (2 * c + 2) * slots;
      const scalar_t* mean_ref = s + (2 * c + 3) * slots;
      const scalar_t* var_ref = s + (3 * c + 3) * slots;
      Tensor b = bias.has_value() && bias->defined() ? bias->to(stats.scalar_type()).contiguous()
                                                     : Tensor();
      const scalar_t* bv = b.defined() ? data_of<scalar_t>(b) : nullptr;
      scalar_t* m = data_of<scalar_t>(mean_out);
      scalar_t* v = data_of<scalar_t>(var_out);
      with_grad_type<scalar_t>(*grads, [&](auto* type) {
      using grad_t = std::remove_pointer_t<decltype(type)>;
      grad_t* g = static_cast<grad_t*>(grads->data_ptr());  // (C, T, D)
      at::parallel_for(0, c, 8, [&](int64_t begin, int64_t end) {
        for (int64_t ch = begin; ch < end; ++ch) {
          const scalar_t* row = th + ch * d;
          const scalar_t* pg = p + (ch / per_group) * d;
          for (int64_t t = 0; t < slots; ++t) {
            const int64_t i = ch * slots + t;
            // an entry that is not compensable holds zero references and zero gradients
            scalar_t row_patch, row_grad;
            dot2(row, pg + t * patch_size, g + (ch * slots + t) * d, d, &row_patch, &row_grad);
            scalar_t mt = mean[i] + row_patch - mean_ref[i];
            if (bv != nullptr) mt += bv[ch] * compensable[t];
            const scalar_t shift = mt - mean[i];
            scalar_t vt = (var[i] + row_grad - var_ref[i]) - shift * shift;
            if (clamp && vt < scalar_t(0)) vt = scalar_t(0);  // (NaN stays NaN, as clamp_min)
            m[i] = mt;
            v[i] = vt;
          }
          if (write_rows) writer->row(ch, g);
        }
      });
      });
    } else if (write_rows) {
      writer->rows(*grads);
    }
    if (writer.has_value()) writer->finish(stats, writer->batch_finite(), patches, grads);
  });
  return {valid, recorded, mean_out, var_out};
}

template <typename scalar_t>
scalar_t lerp(scalar_t self, scalar_t end, scalar_t weight) {  // torch's CPU lerp
  return std::abs(weight) < scalar_t(0.5) ? self + weight * (end - self)
                                          : end - (end - self) * (scalar_t(1) - weight);
}

// Eqs. 9-11 for the current batch and the compensated past, BN's inverse standard deviation, and
// the running statistics: returns (mean, var, invstd, 1/k, finite).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> window_step(
    const Tensor& batch_mean, const Tensor& batch_var, double count, const Tensor& past_mean,
    const Tensor& past_var, const Tensor& valid, const Tensor& recorded,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    const c10::optional<Tensor>& num_batches, bool count_batch, double momentum,
    bool window_running, double eps) {
  check_cpu(batch_mean, "batch_mean");
  const int64_t c = batch_mean.numel(), slots = valid.numel();
  const auto options = batch_mean.options();
  Tensor mean = at::empty({c}, options), var = at::empty({c}, options);
  Tensor invstd = at::empty({c}, options), inv_k_t = at::empty({}, options);
  Tensor finite_t = at::empty({}, options.dtype(at::kBool));
  Tensor pm = past_mean.contiguous(), pv = past_var.contiguous();
  Tensor bm_c = batch_mean.contiguous(), bv_c = batch_var.contiguous();
  AT_DISPATCH_FLOATING_TYPES(batch_mean.scalar_type(), "window_step", [&] {
    const scalar_t* bm = data_of<scalar_t>(bm_c);
    const scalar_t* bv = data_of<scalar_t>(bv_c);
    const scalar_t* M = slots ? data_of<scalar_t>(pm) : nullptr;
    const scalar_t* V = slots ? data_of<scalar_t>(pv) : nullptr;
    const scalar_t* w = slots ? data_of<scalar_t>(valid) : nullptr;
    scalar_t* mo = data_of<scalar_t>(mean);
    scalar_t* vo = data_of<scalar_t>(var);
    scalar_t* io = data_of<scalar_t>(invstd);
    scalar_t total = 0;  // finite_flag: one sum of the variance
    for (int64_t ch = 0; ch < c; ++ch) total += bv[ch];
    const bool finite = (total - total) == scalar_t(0);
    scalar_t k = 0;
    for (int64_t t = 0; t < slots; ++t) k += w[t];
    const scalar_t inv_k = scalar_t(1) / (k + scalar_t(1));
    for (int64_t ch = 0; ch < c; ++ch) {
      const scalar_t* mrow = M + ch * slots;
      const scalar_t* vrow = V + ch * slots;
      scalar_t sum = 0;
      for (int64_t t = 0; t < slots; ++t) sum += mrow[t] * w[t];
      const scalar_t mu = (bm[ch] + sum) * inv_k;
      const scalar_t own = bm[ch] - mu;
      scalar_t spread = 0;
      for (int64_t t = 0; t < slots; ++t) {
        const scalar_t d = mrow[t] - mu;
        spread += (vrow[t] + d * d) * w[t];
      }
      const scalar_t sigma2 = ((bv[ch] + own * own) + spread) * inv_k;
      mo[ch] = mu;
      vo[ch] = sigma2;
      io[ch] = scalar_t(1) / std::sqrt(sigma2 + static_cast<scalar_t>(eps));
    }
    *data_of<scalar_t>(inv_k_t) = inv_k;
    *data_of<bool>(finite_t) = finite;
    if (!running_mean.has_value() || !running_mean->defined()) return;
    TORCH_CHECK(running_mean->scalar_type() == batch_mean.scalar_type() &&
                running_mean->is_contiguous() && running_var->is_contiguous(),
                "running statistics must be contiguous, in the statistics' dtype");
    int64_t batches = 0;
    if (num_batches.has_value() && num_batches->defined()) {
      int64_t* n = num_batches->data_ptr<int64_t>();
      if (count_batch && finite) *n += 1;  // a non-finite batch is not counted
      batches = *n;
    }
    if (!finite) return;  // non-finite statistics never enter the running ones
    const scalar_t factor = momentum >= 0 ? static_cast<scalar_t>(momentum)
                                          : scalar_t(1) / static_cast<scalar_t>(std::max<int64_t>(batches, 1));
    scalar_t* rm = data_of<scalar_t>(*running_mean);
    scalar_t* rv = data_of<scalar_t>(*running_var);
    if (window_running) {
      // unbiased with the window's number of values n: var + var/(n − 1)
      const scalar_t* counts = data_of<scalar_t>(recorded) + 2 * c * slots;
      scalar_t past_count = 0;
      for (int64_t t = 0; t < slots; ++t) past_count += counts[t] * w[t];
      scalar_t less_one = past_count + static_cast<scalar_t>(count - 1.0);
      if (less_one < scalar_t(1)) less_one = scalar_t(1);
      for (int64_t ch = 0; ch < c; ++ch) {
        rm[ch] = lerp(rm[ch], mo[ch], factor);
        rv[ch] = lerp(rv[ch], vo[ch] + vo[ch] / less_one, factor);
      }
    } else {
      const scalar_t unbias = static_cast<scalar_t>(count / std::max(count - 1.0, 1.0));
      for (int64_t ch = 0; ch < c; ++ch) {
        rm[ch] = lerp(rm[ch], bm[ch], factor);
        rv[ch] = lerp(rv[ch], bv[ch] * unbias, factor);
      }
    }
  });
  return {mean, var, invstd, inv_k_t, finite_t};
}

// The current iteration's entry written over ring slot `slot` (EntryWriter), and the tensor
// cursor [slot, filled].
void record_entry(const Tensor& stats, int64_t slot, const Tensor& batch_mean,
                  const Tensor& batch_var, double count, const Tensor& finite,
                  const c10::optional<Tensor>& patch, const c10::optional<Tensor>& var_grad,
                  double scale, const c10::optional<Tensor>& centre_mean,
                  const c10::optional<Tensor>& centre_patch,
                  const c10::optional<Tensor>& patches, const c10::optional<Tensor>& grads,
                  const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                  int64_t groups, const Tensor& cursor, int64_t filled) {
  check_cpu(stats, "stats");
  TORCH_CHECK(finite.scalar_type() == at::kBool && finite.numel() == 1, "finite must be one bool");
  const bool batch_finite = *finite.data_ptr<bool>();  // (on the CPU: no dispatched read)
  const NewEntry entry{slot, batch_mean, batch_var, count, patch, var_grad, scale,
                       centre_mean, centre_patch, cursor, filled};
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "record_entry", [&] {
    EntryWriter<scalar_t> writer(stats, entry, weight, bias, groups, grads);
    if (writer.has_gradients()) writer.rows(*grads);
    writer.finish(stats, batch_finite, patches, grads);
  });
}

// statistics._statistic_gradients_by_unfold for a small conv x = θ * y: the unfolded input as
// columns (C_in·kh·kw, N·positions), written with their sums (the mean patch), and
// ∂var/∂θ = 2/m Σ (x − μ) colsᵀ per group: one matrix product (groups = 1) or inner products
// (groups > 1, e.g. depthwise, where the rows are short).
std::tuple<Tensor, Tensor> unfold_gradients(const Tensor& conv_input, const Tensor& x,
                                            const Tensor& batch_mean, int64_t kh, int64_t kw,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups) {
  check_cpu(x, "x");
  TORCH_CHECK(conv_input.scalar_type() == x.scalar_type() &&
              batch_mean.scalar_type() == x.scalar_type(), "unfold_gradients: one dtype");
  const Tensor in = conv_input.contiguous(), out = x.contiguous();
  const int64_t n = in.size(0), c_in = in.size(1), h = in.size(2), w = in.size(3);
  const int64_t c_out = out.size(1), out_h = out.size(2), out_w = out.size(3);
  const int64_t positions = out_h * out_w, columns = n * positions, k = kh * kw;
  Tensor cols = at::empty({c_in * k, columns}, in.options());
  Tensor centred = at::empty({c_out, columns}, in.options());
  Tensor patch = at::empty({c_in, kh, kw}, in.options());
  Tensor var_grad = at::empty({c_out, c_in / groups * k}, in.options());
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "unfold_gradients", [&] {
    const scalar_t* src = data_of<scalar_t>(in);
    scalar_t* dst = data_of<scalar_t>(cols);
    scalar_t* pm = data_of<scalar_t>(patch);
    at::parallel_for(0, c_in * k, 8, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t ci = row / k, a = (row % k) / kw, b = row % kw;
        scalar_t* col = dst + row * columns;
        double total = 0;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* plane = src + (i * c_in + ci) * h * w;
          for (int64_t oh = 0; oh < out_h; ++oh) {
            const int64_t ih = oh * stride[0] + a * dilation[0] - padding[0];
            scalar_t* o = col + i * positions + oh * out_w;
            if (ih < 0 || ih >= h) {
              std::fill(o, o + out_w, scalar_t(0));
              continue;
            }
            const scalar_t* line = plane + ih * w;
            for (int64_t ow = 0; ow < out_w; ++ow) {
              const int64_t iw = ow * stride[1] + b * dilation[1] - padding[1];
              const scalar_t v = (iw >= 0 && iw < w) ? line[iw] : scalar_t(0);
              o[ow] = v;
              total += v;
            }
          }
        }
        pm[row] = static_cast<scalar_t>(total / static_cast<double>(columns));
      }
    });
    const scalar_t* xs = data_of<scalar_t>(out);
    const scalar_t* mu = data_of<scalar_t>(batch_mean);
    scalar_t* xc = data_of<scalar_t>(centred);
    for (int64_t co = 0; co < c_out; ++co) {
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* from = xs + (i * c_out + co) * positions;
        scalar_t* to = xc + co * columns + i * positions;
        for (int64_t p = 0; p < positions; ++p) to[p] = from[p] - mu[co];
      }
    }
  });
  const double scale = 2.0 / static_cast<double>(columns);
  if (groups == 1) {
    at::addmm_out(var_grad, var_grad, centred, cols.t(), 0, scale);
  } else {
    AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "unfold_gradients_groups", [&] {
      const int64_t per_group = c_out / groups, d = c_in / groups * k;
      const scalar_t* xc = data_of<scalar_t>(centred);
      const scalar_t* cs = data_of<scalar_t>(cols);
      scalar_t* g = data_of<scalar_t>(var_grad);
      at::parallel_for(0, c_out, 1, [&](int64_t begin, int64_t end) {
        for (int64_t co = begin; co < end; ++co) {
          const scalar_t* first = cs + (co / per_group) * d * columns;
          for (int64_t j = 0; j < d; ++j) {
            g[co * d + j] = static_cast<scalar_t>(
                scale * dot(xc + co * columns, first + j * columns, columns));
          }
        }
      });
    });
  }
  return {patch, var_grad};
}

// Batches of more values than this take torch's vectorised kernels for the normalisation and its
// backward; smaller ones (where a kernel's fixed cost dominates) the loops below.
constexpr int64_t kLargeBatch = 1 << 16;

// Eq. 12 at the window statistics: y = x·a + b per channel, a = γ r, b = β − μ̄ a (the form of
// BN's CPU kernel), for NCHW and channels-last batches.
Tensor window_norm_forward(const Tensor& x, const c10::optional<Tensor>& gamma,
                           const c10::optional<Tensor>& beta, const Tensor& mean, const Tensor& var,
                           const Tensor& invstd, double eps) {
  check_cpu(x, "x");
  if (x.numel() > kLargeBatch) {  // BN's inference kernel, vectorised for this CPU
    return std::get<0>(at::native_batch_norm(x, gamma, beta, mean, var, false, 0.0, eps));
  }
  const bool channels_last = !x.is_contiguous() &&
                             x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor in = channels_last ? x : x.contiguous();
  Tensor y = at::empty_like(in);
  const int64_t n = in.size(0), c = in.size(1), hw = in.numel() / std::max<int64_t>(n * c, 1);
  const Tensor g = gamma.has_value() && gamma->defined() ? gamma->contiguous() : Tensor();
  const Tensor b = beta.has_value() && beta->defined() ? beta->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "window_norm_forward", [&] {
    std::vector<scalar_t> scale(c), shift(c);
    const scalar_t* mu = data_of<scalar_t>(mean);
    const scalar_t* r = data_of<scalar_t>(invstd);
    for (int64_t ch = 0; ch < c; ++ch) {
      scale[ch] = g.defined() ? r[ch] * data_of<scalar_t>(g)[ch] : r[ch];
      shift[ch] = (b.defined() ? data_of<scalar_t>(b)[ch] : scalar_t(0)) - mu[ch] * scale[ch];
    }
    const scalar_t* src = data_of<scalar_t>(in);
    scalar_t* dst = data_of<scalar_t>(y);
    if (channels_last) {
      at::parallel_for(0, n * hw, 256, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          for (int64_t ch = 0; ch < c; ++ch) {
            dst[p * c + ch] = src[p * c + ch] * scale[ch] + shift[ch];
          }
        }
      });
    } else {
      at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t ch = plane % c;
          scale_shift(src + plane * hw, dst + plane * hw, hw, scale[ch], shift[ch]);
        }
      });
    }
  });
  return y;
}

// The normalisation's backward on CPU at full precision (window_norm.py): BN's backward at the
// window statistics with the batch terms divided by k,
//   ∂L/∂x = γ r [g − (1/k)(1/m)(Σg + x̂ Σ g x̂)],  ∂L/∂γ = Σ g x̂,  ∂L/∂β = Σ g,
// in two passes per channel over a small NCHW batch (per plane in vectors, the planes summed in
// double); large and channels-last batches through BN's kernel: (1/k)·BN's backward plus
// (1 − 1/k)·γ r g.
std::tuple<Tensor, Tensor, Tensor> window_norm_backward(
    const Tensor& grad_y, const Tensor& x, const c10::optional<Tensor>& gamma, const Tensor& mean,
    const Tensor& invstd, const Tensor& inv_k, double eps) {
  const bool affine = gamma.has_value() && gamma->defined();
  if (!x.is_contiguous() || !grad_y.is_contiguous() || x.numel() > kLargeBatch) {
    Tensor scale = affine ? *gamma * inv_k : inv_k.expand(mean.sizes()).contiguous();
    auto result = at::native_batch_norm_backward(grad_y, x, scale, {}, {}, mean, invstd, true, eps,
                                                 {true, true, true});
    Tensor scaled = affine ? *gamma * invstd : invstd;
    Tensor rest = at::addcmul(scaled, scaled, inv_k, -1.0);  // (1 − 1/k)·γ r
    std::get<0>(result).addcmul_(grad_y, rest.view({1, -1, 1, 1}));
    return result;
  }
  const int64_t n = x.size(0), c = x.size(1), hw = x.numel() / std::max<int64_t>(n * c, 1);
  Tensor grad_x = at::empty_like(x), grad_w = at::empty({c}, mean.options());
  Tensor grad_b = at::empty({c}, mean.options());
  Tensor g_c = affine ? gamma->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "window_norm_backward", [&] {
    const scalar_t* xp = data_of<scalar_t>(x);
    const scalar_t* gy = data_of<scalar_t>(grad_y);
    const scalar_t* mu = data_of<scalar_t>(mean);
    const scalar_t* r = data_of<scalar_t>(invstd);
    const scalar_t* gm = affine ? data_of<scalar_t>(g_c) : nullptr;
    const double k_inv = static_cast<double>(*data_of<scalar_t>(inv_k));
    const double m = static_cast<double>(n * hw);
    scalar_t* gx = data_of<scalar_t>(grad_x);
    scalar_t* gw = data_of<scalar_t>(grad_w);
    scalar_t* gb = data_of<scalar_t>(grad_b);
    at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        // per plane in vectors, the planes summed in double
        const scalar_t centre = mu[ch];
        double sum_dy = 0, sum_dy_xmu = 0;
        for (int64_t i = 0; i < n; ++i) {
          scalar_t plane_dy, plane_dy_xmu;
          grad_sums(gy + (i * c + ch) * hw, xp + (i * c + ch) * hw, hw, centre, &plane_dy,
                    &plane_dy_xmu);
          sum_dy += plane_dy;
          sum_dy_xmu += plane_dy_xmu;
        }
        const double rc = static_cast<double>(r[ch]);
        const double scale = (gm != nullptr ? static_cast<double>(gm[ch]) : 1.0) * rc;
        const double sum_dy_xhat = sum_dy_xmu * rc;
        gw[ch] = static_cast<scalar_t>(sum_dy_xhat);
        gb[ch] = static_cast<scalar_t>(sum_dy);
        // ∂L/∂x = a·g + b·(x − μ̄) + d
        const scalar_t a = static_cast<scalar_t>(scale);
        const scalar_t b = static_cast<scalar_t>(-scale * k_inv / m * rc * sum_dy_xhat);
        const scalar_t d = static_cast<scalar_t>(-scale * k_inv / m * sum_dy);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t at = (i * c + ch) * hw;
          grad_input(gy + at, xp + at, gx + at, hw, centre, a, b, d);
        }
      }
    });
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace cbn_mmdet

TORCH_LIBRARY(cbn_mmdet, m) {
  m.def("past_window(Tensor stats, Tensor in_window, Tensor? weight, Tensor? patches, "
        "Tensor? grads, Tensor? bias, int groups, bool clamp) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("window_step(Tensor batch_mean, Tensor batch_var, float count, Tensor past_mean, "
        "Tensor past_var, Tensor valid, Tensor recorded, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches, bool count_batch, float momentum, "
        "bool window_running, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("record_entry(Tensor(a!) stats, int slot, Tensor batch_mean, Tensor batch_var, "
        "float count, Tensor finite, Tensor? patch, Tensor? var_grad, float scale, "
        "Tensor? centre_mean, Tensor? centre_patch, Tensor(b!)? patches, "
        "Tensor(c!)? grads, Tensor? weight, Tensor? bias, int groups, Tensor(d!) cursor, "
        "int filled) -> ()");
  m.def("window_norm_backward(Tensor grad_y, Tensor x, Tensor? gamma, Tensor mean, "
        "Tensor invstd, Tensor inv_k, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("window_norm_forward(Tensor x, Tensor? gamma, Tensor? beta, Tensor mean, Tensor var, "
        "Tensor invstd, float eps) -> Tensor");
  m.def("unfold_gradients(Tensor conv_input, Tensor x, Tensor batch_mean, int kh, int kw, "
        "int[] stride, int[] padding, int[] dilation, int groups) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cbn_mmdet, CPU, m) {
  m.impl("past_window",
         static_cast<std::tuple<Tensor, Tensor, Tensor, Tensor> (*)(
             const Tensor&, const Tensor&, const c10::optional<Tensor>&,
             const c10::optional<Tensor>&, const c10::optional<Tensor>&,
             const c10::optional<Tensor>&, int64_t, bool)>(&cbn_mmdet::past_window));
  m.impl("window_step", &cbn_mmdet::window_step);
  m.impl("record_entry", &cbn_mmdet::record_entry);
  m.impl("window_norm_backward", &cbn_mmdet::window_norm_backward);
  m.impl("window_norm_forward", &cbn_mmdet::window_norm_forward);
  m.impl("unfold_gradients", &cbn_mmdet::unfold_gradients);
}
