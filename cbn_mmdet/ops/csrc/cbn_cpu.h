// The fused CPU ops of cbn_cpu.cpp, for the training step of train_step.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace cbn_mmdet {

// A new entry for the ring, as record_entry takes it: the batch's statistics and count, the
// statistic gradients (absent: recorded uncompensated; the product is scaled, and centred when
// centre_mean is given), the tensor cursor and the number of entries filled after it.
struct NewEntry {
  int64_t slot;
  at::Tensor batch_mean, batch_var;
  double count;
  c10::optional<at::Tensor> patch, var_grad;
  double scale;
  c10::optional<at::Tensor> centre_mean, centre_patch;
  at::Tensor cursor;
  int64_t filled;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> past_window(
    const at::Tensor& stats, const at::Tensor& in_window, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& patches, const c10::optional<at::Tensor>& grads,
    const c10::optional<at::Tensor>& bias, int64_t groups, bool clamp);

// (the window's weights by slot as numbers; with `record`, that entry written in the same pass)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> past_window(
    const at::Tensor& stats, const std::vector<double>& in_window,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& patches,
    const c10::optional<at::Tensor>& grads, const c10::optional<at::Tensor>& bias, int64_t groups,
    bool clamp, const NewEntry* record = nullptr);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_step(
    const at::Tensor& batch_mean, const at::Tensor& batch_var, double count,
    const at::Tensor& past_mean, const at::Tensor& past_var, const at::Tensor& valid,
    const at::Tensor& recorded, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& num_batches,
    bool count_batch, double momentum, bool window_running, double eps);

void record_entry(const at::Tensor& stats, int64_t slot, const at::Tensor& batch_mean,
                  const at::Tensor& batch_var, double count, const at::Tensor& finite,
                  const c10::optional<at::Tensor>& patch, const c10::optional<at::Tensor>& var_grad,
                  double scale, const c10::optional<at::Tensor>& centre_mean,
                  const c10::optional<at::Tensor>& centre_patch,
                  const c10::optional<at::Tensor>& patches, const c10::optional<at::Tensor>& grads,
                  const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                  int64_t groups, const at::Tensor& cursor, int64_t filled);

std::tuple<at::Tensor, at::Tensor> unfold_gradients(
    const at::Tensor& conv_input, const at::Tensor& x, const at::Tensor& batch_mean, int64_t kh,
    int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups);

at::Tensor window_norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                               const c10::optional<at::Tensor>& beta, const at::Tensor& mean,
                               const at::Tensor& var, const at::Tensor& invstd, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_norm_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& inv_k, double eps);

}  // namespace cbn_mmdet
