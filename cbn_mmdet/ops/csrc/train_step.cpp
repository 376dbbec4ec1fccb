// A CBN layer's whole eager training forward on CPU in two calls: train_step (the conv found from
// the autograd graph, the compensated past, the batch moments, Eqs. 9-11 with the running
// statistics, the record of the new entry with its statistic gradients) and normalise (Eq. 12,
// whose autograd node, backward and double backward, is C++ too).
//
// It is the steady state of CrossIterationBatchNorm2d.forward (cbn_mmdet/models/cbn.py) and
// computes what that forward computes with the fused ops, in the same order. It handles only the
// case the caller has seen before (the same binding status, a ring already laid out for the conv)
// and returns nothing otherwise, before changing any state: the Python forward then runs, with its
// checks, warnings and every other mode.
#include "cbn_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/generated/Functions.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// How the input was produced; the codes of cbn.py's _ONE_CALL_STATUS.
enum Status : int64_t { kConv = 0, kFrozen = 1, kNotConv = 2, kOther = 3 };

struct Binding {
  Status status = kOther;
  Tensor input, weight, bias;  // the conv's input and its weight and bias parameters (detached)
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
};

// the conv node's geometry: symbolic integers in recent torch, plain ones in torch 2.1
int64_t int_of(const c10::SymInt& v) { return v.expect_int(); }
int64_t int_of(int64_t v) { return v; }

template <typename T>
std::vector<int64_t> ints(const std::vector<T>& values) {
  std::vector<int64_t> out;
  for (const auto& v : values) out.push_back(int_of(v));
  return out;
}

bool cpu_autocast_enabled() {
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 4
  return at::autocast::is_cpu_enabled();
#else
  return at::autocast::is_autocast_enabled(at::kCPU);
#endif
}

// The leaf behind a parameter edge: undefined when the edge carries something computed.
Tensor leaf_of(const torch::autograd::Edge& edge) {
  auto* accumulate = dynamic_cast<torch::autograd::AccumulateGrad*>(edge.function.get());
  return accumulate == nullptr ? Tensor() : accumulate->variable;
}

// conv_binding.find_conv_producer, for the case of a conv whose weight (and bias) are parameters;
// anything else is kOther (the Python forward decides). `read_conv`: also the conv's input and
// geometry (for compensation), else the status alone.
Binding bind(const Tensor& x, bool read_conv) {
  Binding b;
  const auto& fn = x.grad_fn();
  if (!fn) {
    b.status = kFrozen;  // nothing upstream requires grad
    return b;
  }
  auto* conv = dynamic_cast<torch::autograd::generated::ConvolutionBackward0*>(fn.get());
  if (conv == nullptr) {
    b.status = fn->name().rfind("CompiledFunction", 0) == 0 ? kOther : kNotConv;
    return b;
  }
  if (conv->transposed || conv->stride.size() != 2) {
    b.status = kNotConv;
    return b;
  }
  if (!conv->next_edge(1).function) {
    b.status = kFrozen;
    return b;
  }
  Tensor weight = leaf_of(conv->next_edge(1));
  if (!weight.defined()) return b;  // computed (weight standardisation) or cast (AMP)
  if (conv->num_outputs() > 2 && conv->next_edge(2).function) {
    b.bias = leaf_of(conv->next_edge(2));
    if (!b.bias.defined()) {
      // a computed bias cannot be compensated; a cast one (AMP) is left to the Python forward
      b.status = conv->next_edge(2).function->name() == "ToCopyBackward0" ? kOther : kNotConv;
      return b;
    }
    b.bias = b.bias.detach();
  }
  // (the weight edge is the parameter's accumulator: the conv applied the parameter itself)
  b.status = kConv;
  if (!read_conv) return b;
  b.input = conv->input_.unpack();
  if (!b.input.defined()) {
    b.status = kOther;
    return b;
  }
  b.weight = weight.detach();
  b.stride = ints(conv->stride);
  b.padding = ints(conv->padding);
  b.dilation = ints(conv->dilation);
  b.groups = int_of(conv->groups);
  return b;
}

// statistics.patch_mean, the same operations in the same order (so that a step taken here and
// one taken by the Python forward give the same bits: a resumed run continues exactly).
Tensor patch_mean(const Tensor& input, int64_t kh, int64_t kw, int64_t out_h, int64_t out_w,
                  const Binding& b) {
  const int64_t count = input.size(0) * out_h * out_w;
  Tensor summed = input.sum(0);  // (C_in, H, W)
  const int64_t sh = b.stride[0], sw = b.stride[1], ph = b.padding[0], pw = b.padding[1];
  if (kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0) {
    return (summed.sum({1, 2}) / count).reshape({-1, 1, 1});
  }
  if (ph != 0 || pw != 0) summed = at::constant_pad_nd(summed, {pw, pw, ph, ph}, 0);
  std::vector<Tensor> rows, columns;
  for (int64_t a = 0; a < kh; ++a) {
    const int64_t start = a * b.dilation[0];
    rows.push_back(summed.slice(1, start, start + (out_h - 1) * sh + 1, sh).sum(1));
  }
  Tensor row_sums = at::stack(rows, 1);  // (C_in, kh, W)
  for (int64_t bb = 0; bb < kw; ++bb) {
    const int64_t start = bb * b.dilation[1];
    columns.push_back(row_sums.slice(2, start, start + (out_w - 1) * sw + 1, sw).sum(2));
  }
  return at::stack(columns, 2) / count;
}

// What the record needs of the statistic gradients (cf. DeferredCentring): ∂μ/∂θ as a patch and
// ∂var/∂θ = scale · product − 2 μ ⊗ centre_patch (no centring when centre_patch is undefined).
struct Gradients {
  Tensor patch, product, centre_patch;
  double scale = 1.0;
};

// How conv_statistic_gradients (closed form) takes the gradients of this conv
enum class GradientPath { kUnfold, kCovariance, kMatmul, kWeightGradient };

GradientPath gradient_path(const Tensor& x, const Binding& b, int64_t kh, int64_t kw,
                           int64_t max_elements, int64_t max_positions,
                           int64_t matmul_max_positions) {
  const int64_t n = x.size(0), positions = n * x.size(2) * x.size(3);
  const int64_t c_in = b.input.size(1), c_out = b.weight.size(0);
  if (kh * kw > 1 && (n * c_in * kh * kw * x.size(2) * x.size(3) <= max_elements ||
                      positions <= max_positions)) {
    return GradientPath::kUnfold;
  }
  const bool padded = b.padding[0] != 0 || b.padding[1] != 0;
  if (kh == 1 && kw == 1 && !padded && b.groups == 1 &&
      static_cast<double>(b.input.size(1)) * static_cast<double>(positions + c_out) <
          0.7 * static_cast<double>(c_out) * static_cast<double>(positions)) {
    return GradientPath::kCovariance;
  }
  if (kh == 1 && kw == 1 && !padded && b.groups == 1 && positions <= matmul_max_positions) {
    return GradientPath::kMatmul;
  }
  return GradientPath::kWeightGradient;
}

// statistics._strided_positions: the input values of an unpadded 1×1 conv's output x
Tensor strided_positions(const Tensor& input, const Tensor& x, const Binding& b) {
  if (b.stride[0] == 1 && b.stride[1] == 1) return input;
  return input.slice(2, 0, (x.size(2) - 1) * b.stride[0] + 1, b.stride[0])
      .slice(3, 0, (x.size(3) - 1) * b.stride[1] + 1, b.stride[1]);
}

Gradients statistic_gradients(const Tensor& x, const Tensor& batch_mean, const Binding& b,
                              GradientPath path, bool bfloat16_product) {
  const int64_t kh = b.weight.size(2), kw = b.weight.size(3);
  const int64_t n = x.size(0), c_out = x.size(1);
  Gradients g;
  if (path == GradientPath::kUnfold) {  // statistics._statistic_gradients_by_unfold
    std::tie(g.patch, g.product) = cbn_mmdet::unfold_gradients(
        b.input, x, batch_mean, kh, kw, b.stride, b.padding, b.dilation, b.groups);
    return g;
  }
  g.patch = patch_mean(b.input, kh, kw, x.size(2), x.size(3), b);
  const double count = static_cast<double>(n * x.size(2) * x.size(3));
  if (path == GradientPath::kCovariance) {  // statistics._variance_weight_gradient_1x1
    const Tensor y = strided_positions(b.input, x, b);
    const int64_t c_in = y.size(1);
    Tensor flat = y.reshape({n, c_in, -1});
    const int64_t positions = n * flat.size(2);
    Tensor mean = g.patch.reshape({c_in, 1});
    Tensor cov = at::bmm(flat, flat.transpose(1, 2)).sum(0).div_(positions).sub_(at::mm(mean, mean.t()));
    g.product = at::mm(b.weight.reshape({c_out, c_in}), cov).mul_(2.0);
    return g;
  }
  // statistics.variance_weight_gradient: the weight-gradient product of the output itself,
  // centred by the record as it writes it; on bfloat16 operands (var_grad_dtype) centred first
  // and formed here
  const at::ScalarType operands = bfloat16_product ? at::kBFloat16 : x.scalar_type();
  const Tensor grad_out =
      (bfloat16_product ? at::sub(x, batch_mean.view({1, -1, 1, 1})) : x).to(operands);
  if (path == GradientPath::kMatmul) {  // statistics.weight_gradient_1x1
    const Tensor y = strided_positions(b.input, x, b).to(operands);
    const int64_t c_in = y.size(1);
    Tensor product = at::empty({c_out, c_in}, grad_out.options());
    at::addbmm_out(product, product, grad_out.reshape({n, c_out, -1}),
                   y.reshape({n, c_in, -1}).transpose(1, 2), 0, 1);
    g.product = product.view({c_out, c_in, 1, 1});
  } else {
    g.product = std::get<1>(at::convolution_backward(
        grad_out, b.input.to(operands), b.weight.to(operands), c10::nullopt, b.stride, b.padding,
        b.dilation, false, {0, 0}, b.groups, {false, true, false}));
  }
  g.product = g.product.to(x.scalar_type());
  if (bfloat16_product) {
    g.product.mul_(2.0 / count);
    return g;
  }
  g.scale = 2.0 / count;
  g.centre_patch = g.patch;
  return g;
}

at::MemoryFormat memory_format_of(const Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()
             ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace

namespace cbn_mmdet {

// window_norm.WindowBatchNormFunction for one process's batch at full precision (named so in
// autograd's graph and the profiler).
struct WindowNormFunction : public torch::autograd::Function<WindowNormFunction> {
  // (γ, β absent: no affine transform, or no β)
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& gamma,
                        const c10::optional<Tensor>& beta, const Tensor& mean, const Tensor& var,
                        const Tensor& invstd, const Tensor& inv_k, double eps) {
    const Tensor g = gamma.value_or(Tensor());
    ctx->save_for_backward({x, g, mean, invstd, inv_k});
    ctx->saved_data["eps"] = eps;
    // needs_input_grad counts the tensors given, an absent one is not
    ctx->saved_data["beta_index"] = static_cast<int64_t>(g.defined() ? 2 : 1);
    ctx->saved_data["has_beta"] = beta.has_value() && beta->defined();
    return window_norm_forward(x, gamma, beta, mean, var, invstd, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &gamma = saved[1], &mean = saved[2], &invstd = saved[3],
                 &inv_k = saved[4];
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = gamma.defined() && ctx->needs_input_grad(1);
    const bool need_b = gamma.defined() && ctx->saved_data["has_beta"].toBool() &&
                        ctx->needs_input_grad(ctx->saved_data["beta_index"].toInt());
    Tensor grad_y = grad_outputs[0].contiguous(memory_format_of(x));
    Tensor grad_x, grad_w, grad_b;
    if (at::GradMode::is_enabled()) {
      std::tie(grad_x, grad_w, grad_b) = differentiable_backward(grad_y, x, gamma, mean, invstd,
                                                                 inv_k, need_x, need_w, need_b);
    } else if (!need_x) {
      // γ and β only (nothing before the layer trains), as WindowBatchNormFunction takes them
      Tensor ones = gamma.defined() ? gamma : at::ones_like(mean);
      auto sums = at::native_batch_norm_backward(grad_y, x, ones, {}, {}, mean, invstd, true,
                                                 ctx->saved_data["eps"].toDouble(),
                                                 {false, true, true});
      grad_w = std::get<1>(sums);
      grad_b = std::get<2>(sums);
    } else {
      std::tie(grad_x, grad_w, grad_b) = cbn_mmdet::window_norm_backward(
          grad_y, x, gamma.defined() ? c10::optional<Tensor>(gamma) : c10::nullopt, mean, invstd,
          inv_k, ctx->saved_data["eps"].toDouble());
    }
    return {need_x ? grad_x : Tensor(), need_w ? grad_w : Tensor(), need_b ? grad_b : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }

  // window_norm._differentiable_backward without a process group (create_graph=True): the
  // backward's formula in differentiable operations, with the window's statistics as functions
  // of x through the current batch only.
  static std::tuple<Tensor, Tensor, Tensor> differentiable_backward(
      const Tensor& grad_y, const Tensor& x, const Tensor& gamma, const Tensor& mean,
      const Tensor& invstd, const Tensor& inv_k, bool need_x, bool need_w, bool need_b) {
    const std::vector<int64_t> shape = {1, -1, 1, 1}, dims = {0, 2, 3};
    const double count = static_cast<double>(x.size(0) * x.size(2) * x.size(3));
    Tensor u = x - mean.view(shape);
    Tensor sum_u = u.sum(dims), sum_uu = u.square().sum(dims);
    Tensor sum_dy = grad_y.sum(dims), sum_dy_u = (grad_y * u).sum(dims);
    Tensor d_mean = sum_u / count;
    d_mean = d_mean - d_mean.detach();
    Tensor d_second = sum_uu / count;
    d_second = d_second - d_second.detach();
    Tensor shift = d_mean * inv_k;
    Tensor d_var = (d_second - d_mean * shift) * inv_k;
    Tensor r = invstd * at::rsqrt(1.0 + d_var * invstd.square());
    Tensor xhat = (u - shift.view(shape)) * r.view(shape);
    Tensor sum_dy_xhat = r * (sum_dy_u - shift * sum_dy);
    Tensor grad_x;
    if (need_x) {
      Tensor a = gamma.defined() ? gamma * r : r;
      Tensor scale = inv_k / count;
      Tensor inner = grad_y - scale * (sum_dy.view(shape) + xhat * sum_dy_xhat.view(shape));
      grad_x = (a.view(shape) * inner).contiguous(memory_format_of(x));
    }
    return {grad_x, need_w ? sum_dy_xhat : Tensor(), need_b ? sum_dy : Tensor()};
  }
};

}  // namespace cbn_mmdet

namespace {

// a part of the step, named in torch.profiler's traces (free when nothing records)
#define PART(name) RECORD_FUNCTION("cbn_mmdet::train_step." name, c10::ArrayRef<const c10::IValue>{})

c10::optional<Tensor> some(const Tensor& t) {
  return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt;
}

bool same_type(const c10::optional<Tensor>& t, const Tensor& like) {
  return !t.has_value() || !t->defined() ||
         (t->scalar_type() == like.scalar_type() && t->device() == like.device());
}

// Everything of the step before the normalisation: (μ̄, σ̄², r, 1/k) for normalise(), the past
// window as WindowHistory.past would cache it (valid, recorded, mean, var), and the conv weight's
// [data pointer, version] when the past was compensated. Nothing (and no state changed) when this
// call is not the case handled here. The normalisation is a call of its own, made after the
// caller has taken note of the record: its saved tensors can end a checkpoint's recomputation
// (an exception from the saved-tensor hook), which must find the history's record complete.
using Step = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

c10::optional<Step> train_step(
    const Tensor& x, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    const Tensor& stats, const c10::optional<Tensor>& patches, const c10::optional<Tensor>& grads,
    const Tensor& cursor, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& num_batches,
    int64_t active_window, int64_t status, bool compensate, at::IntArrayRef geometry,
    double momentum, bool window_running, double eps, int64_t unfold_max_elements,
    int64_t unfold_max_positions, int64_t matmul_max_positions, bool bfloat16_product) {
  const c10::optional<Step> declined;
  // -- the case handled: everything the Python forward would check or convert, checked first
  const int64_t rows = stats.size(0), slots = stats.size(1), c = (rows - 3) / 4;
  if (!x.device().is_cpu() || x.dim() != 4 || x.size(1) != c || x.numel() == 0 ||
      x.scalar_type() != stats.scalar_type() || !at::GradMode::is_enabled() ||
      cpu_autocast_enabled() || !same_type(gamma, x) ||
      !same_type(beta, x) || !same_type(running_mean, x) || !same_type(running_var, x)) {
    return declined;
  }
  const int64_t count_values = x.size(0) * x.size(2) * x.size(3);
  const int64_t* cur = cursor.data_ptr<int64_t>();
  const int64_t head = cur[0], filled = cur[1];
  if (count_values <= 1 || filled < 1 || active_window < 2) return declined;
  Binding b;
  {
    PART("bind");
    b = bind(x, compensate);
  }
  if (b.status != status) return declined;
  const bool compensating = compensate && b.status == kConv;
  GradientPath path = GradientPath::kUnfold;
  if (compensating) {
    const int64_t kh = b.weight.size(2), kw = b.weight.size(3);
    const int64_t bias_flag = b.bias.defined() ? 1 : 0;
    const std::vector<int64_t> want = {b.weight.size(0), b.weight.size(1) * b.groups, kh, kw,
                                       b.groups, bias_flag};
    if (geometry.vec() != want || !grads.has_value() || !grads->defined() ||
        (grads->scalar_type() != x.scalar_type() && grads->scalar_type() != at::kBFloat16) || b.weight.scalar_type() != x.scalar_type() ||
        b.input.scalar_type() != x.scalar_type() ||
        (b.bias.defined() && b.bias.scalar_type() != x.scalar_type())) {
      return declined;
    }
    path = gradient_path(x, b, kh, kw, unfold_max_elements, unfold_max_positions,
                         matmul_max_positions);
  }
  at::NoGradGuard no_grad;
  Tensor xd = x.detach();
  // -- the slots in the past window
  std::vector<double> window(slots);
  const int64_t last = std::min(filled, active_window - 1);  // the open entry is not this one's
  for (int64_t slot = 0; slot < slots; ++slot) {
    const int64_t age = ((head - slot) % slots + slots) % slots;
    window[slot] = age < last ? 1.0 : 0.0;
  }
  // -- the batch and its statistic gradients
  Tensor batch_mean, batch_var;
  const double count = static_cast<double>(count_values);
  {
    PART("batch");
    std::tie(batch_mean, batch_var) = at::batch_norm_update_stats(xd, {}, {}, 0.0);
  }
  Gradients g;
  if (compensating) {
    PART("statistic_gradients");
    g = statistic_gradients(xd, batch_mean, b, path, bfloat16_product);
  }
  // -- the past window (WindowHistory.past) compensated to θ now, and in the same pass the
  // record (WindowHistory._record_fused) over the oldest slot
  const cbn_mmdet::NewEntry entry{
      (head + 1) % slots, batch_mean, batch_var, count, some(g.patch), some(g.product), g.scale,
      g.centre_patch.defined() ? c10::optional<Tensor>(batch_mean) : c10::nullopt,
      some(g.centre_patch), cursor, std::min(filled + 1, slots)};
  Tensor valid, recorded, past_mean, past_var;
  {
    PART("past_and_record");
    std::tie(valid, recorded, past_mean, past_var) = cbn_mmdet::past_window(
        stats, window, compensating ? some(b.weight) : c10::nullopt, patches, grads,
        compensating ? some(b.bias) : c10::nullopt, b.groups, true, &entry);
  }
  // -- Eqs. 9-11, the running statistics
  Tensor mean, var, invstd, inv_k, finite;
  {
    PART("window");
    std::tie(mean, var, invstd, inv_k, finite) = cbn_mmdet::window_step(
        batch_mean, batch_var, count, past_mean, past_var, valid, recorded, running_mean,
        running_var, num_batches, true, momentum, window_running, eps);
  }
  Tensor weight_state;
  if (compensating) {
    weight_state = at::empty({2}, at::TensorOptions().dtype(at::kLong));
    int64_t* state = weight_state.data_ptr<int64_t>();
    state[0] = reinterpret_cast<int64_t>(b.weight.data_ptr());
    state[1] = static_cast<int64_t>(b.weight._version());
  }
  // -- Eq. 12, differentiable in x, γ, β through the current batch only
  return Step{mean, var, invstd, inv_k, valid, recorded, past_mean, past_var, weight_state};
}

// Eq. 12, differentiable in x, γ, β through the current batch only.
Tensor normalise(const Tensor& x, const c10::optional<Tensor>& gamma,
                 const c10::optional<Tensor>& beta, const Tensor& mean, const Tensor& var,
                 const Tensor& invstd, const Tensor& inv_k, double eps) {
  RECORD_FUNCTION("cbn_mmdet::normalise", c10::ArrayRef<const c10::IValue>{});
  return cbn_mmdet::WindowNormFunction::apply(x, gamma, beta, mean, var, invstd, inv_k, eps);
}

}  // namespace

// A Python function rather than a dispatched op: a dispatched call boxes its 19 arguments (about
// 10 µs here, a fifth of what the step adds to BN's); the step is eager and CPU-only, so it needs
// none of the dispatcher's other services.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train_step", [](const Tensor& x, const c10::optional<Tensor>& gamma,
                         const c10::optional<Tensor>& beta, const Tensor& stats,
                         const c10::optional<Tensor>& patches, const c10::optional<Tensor>& grads,
                         const Tensor& cursor, const c10::optional<Tensor>& running_mean,
                         const c10::optional<Tensor>& running_var,
                         const c10::optional<Tensor>& num_batches, int64_t active_window,
                         int64_t status, bool compensate, std::vector<int64_t> geometry,
                         double momentum, bool window_running, double eps,
                         int64_t unfold_max_elements, int64_t unfold_max_positions,
                         int64_t matmul_max_positions, bool bfloat16_product) {
    RECORD_FUNCTION("cbn_mmdet::train_step", c10::ArrayRef<const c10::IValue>{});
    return train_step(x, gamma, beta, stats, patches, grads, cursor, running_mean, running_var,
                      num_batches, active_window, status, compensate, geometry, momentum,
                      window_running, eps, unfold_max_elements, unfold_max_positions,
                      matmul_max_positions, bfloat16_product);
  });
  m.def("normalise", &normalise);
}
