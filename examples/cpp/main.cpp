// Calls safeshape's ops from C++ and checks them against values computed here with plain ATen.
// Exit code 0 and "safeshape C++ example: OK" when every check passes.
#include <ATen/ATen.h>
#include <safeshape/ops.h>

#include <cmath>
#include <cstdio>

namespace {

int failures = 0;

void check(bool ok, const char* what, double got, double want) {
  std::printf("%-48s got %.9g want %.9g %s\n", what, got, want, ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

}  // namespace

int main() {
  const safeshape::BuildInfo info = safeshape::build_info();
  std::printf("safeshape built against torch %s, CUDA %s\n", info.torch_version.c_str(), info.cuda ? "on" : "off");

  at::manual_seed(0);
  const int64_t d_out = 96, d_in = 80, r = 8;
  const at::Tensor base = at::randn({d_out, d_in});
  const at::Tensor aligned = base + 0.05 * at::randn({d_out, d_in});
  const at::Tensor lora_b = at::randn({d_out, r});
  const at::Tensor lora_a = at::randn({r, d_in});

  // Safe LoRA projection: B' = V (V^T B) / ||V||_F, against the explicit C = V V^T / ||V||_F in float64.
  auto [projected, v_norm] = safeshape::project_lora_b(aligned, base, lora_b);
  const at::Tensor V = (aligned - base).to(at::kDouble);
  const double norm = V.norm().item<double>();
  const at::Tensor want = at::mm(at::mm(V, V.t()) / norm, lora_b.to(at::kDouble));
  const double rel = ((projected.to(at::kDouble) - want).norm() / want.norm()).item<double>();
  check(rel < 1e-5, "project_lora_b relative error", rel, 0.0);
  check(std::abs(v_norm.item<double>() - norm) < 1e-4 * norm, "project_lora_b ||V||_F", v_norm.item<double>(), norm);

  // Cosine between C dW and dW, against the direct float64 formula.
  const double cos = safeshape::lora_cosine(lora_b, projected, lora_a).item<double>();
  const at::Tensor dw = at::mm(lora_b.to(at::kDouble), lora_a.to(at::kDouble));
  const at::Tensor cdw = at::mm(projected.to(at::kDouble), lora_a.to(at::kDouble));
  const double cos_want = ((dw * cdw).sum() / (dw.norm() * cdw.norm())).item<double>();
  check(std::abs(cos - cos_want) < 1e-6, "lora_cosine", cos, cos_want);

  const at::Tensor C = safeshape::alignment_projection_matrix(aligned, base);
  const double c_err = (C.to(at::kDouble) - at::mm(V, V.t()) / norm).abs().max().item<double>();
  check(c_err < 1e-4, "alignment_projection_matrix max abs error", c_err, 0.0);

  // DSS loss and its backward against plain ATen (log_softmax, gather) on random logits: l_t from the row op, the
  // objective and dloss/dl_t from token_objective, dloss/dz in place from token_logprobs_backward_.
  const int64_t n = 12, vocab = 50;
  const double kl_coef = 0.5;
  const at::Tensor logits = 3.0 * at::randn({n, vocab});
  at::Tensor labels = at::randint(0, vocab, {n}, at::kLong);
  labels[3] = -100;  // an ignored row
  const at::Tensor w = at::rand({n});
  const at::Tensor ref_lp = -at::rand({n}) * 5.0;
  auto [logprobs, lse] = safeshape::token_logprobs(logits, labels);
  const double kl_params[] = {kl_coef};
  auto [loss, dloss] = safeshape::token_objective(logprobs, labels, w, ref_lp, std::nullopt, "dss_k2", kl_params);
  const at::Tensor valid = labels.ne(-100);
  const at::Tensor lp_all = at::log_softmax(logits.to(at::kDouble), 1);
  const at::Tensor l = lp_all.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1) * valid;
  const at::Tensor wd = w.to(at::kDouble), rd = ref_lp.to(at::kDouble);
  const at::Tensor loss_want = (wd * -l + kl_coef * (1 - wd) * 0.5 * (l - rd).pow(2)) * valid;
  const double loss_err = (loss.to(at::kDouble) - loss_want).abs().max().item<double>();
  check(loss_err < 1e-5, "token_objective dss_k2 max abs error", loss_err, 0.0);
  const at::Tensor g = at::rand({n});  // a different upstream gradient per token
  at::Tensor grad = logits.clone();
  safeshape::token_logprobs_backward_(grad, g * dloss, labels, lse);  // grad now holds dloss/dlogits
  const at::Tensor c = (wd - kl_coef * (1 - wd) * (l - rd)) * g.to(at::kDouble) * valid;
  const at::Tensor onehot = at::one_hot(labels.clamp_min(0), vocab).to(at::kDouble);
  const at::Tensor grad_want = c.unsqueeze(1) * (lp_all.exp() - onehot);
  const double grad_err = (grad.to(at::kDouble) - grad_want).abs().max().item<double>();
  check(grad_err < 1e-6, "token_logprobs_backward_ max abs error", grad_err, 0.0);

  // The lm-head-fused op with the gradients of the summed loss from the same pass (3 chunks of 5 rows).
  const int64_t hdim = 16;
  const at::Tensor hidden = at::randn({n, hdim}), head = at::randn({vocab, hdim}) / 4.0;
  auto [floss, flp, fdl, grad_hidden, grad_head] = safeshape::fused_linear_token_loss(
      hidden, head, labels, w, ref_lp, std::nullopt, "dss_k2", kl_params, -100, 5, true, true);
  const at::Tensor z = at::mm(hidden.to(at::kDouble), head.to(at::kDouble).t());
  const at::Tensor lz = at::log_softmax(z, 1);
  const at::Tensor fl = lz.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1) * valid;
  const at::Tensor fc = (wd - kl_coef * (1 - wd) * (fl - rd)) * valid;
  const at::Tensor gz = fc.unsqueeze(1) * (lz.exp() - onehot);
  const double gh_err = (grad_hidden.to(at::kDouble) - at::mm(gz, head.to(at::kDouble))).abs().max().item<double>();
  const double gw_err = (grad_head.to(at::kDouble) - at::mm(gz.t(), hidden.to(at::kDouble))).abs().max().item<double>();
  check(gh_err < 1e-5, "fused_linear_token_loss grad_hidden max abs error", gh_err, 0.0);
  check(gw_err < 1e-5, "fused_linear_token_loss grad_weight max abs error", gw_err, 0.0);

  if (failures) {
    std::printf("safeshape C++ example: %d FAILED\n", failures);
    return 1;
  }
  std::printf("safeshape C++ example: OK\n");
  return 0;
}
