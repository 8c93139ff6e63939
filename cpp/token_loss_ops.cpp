// The device-neutral token-loss ops (docs/math.md#dss-loss, docs/math.md#deep-token), registered once for every device
// (CompositeExplicitAutograd): the per-token objectives and the lm-head-fused loss, which calls the row ops
// (token_logprobs, token_logprobs_backward_) through the dispatcher on one chunk of rows at a time.
//
// Every objective depends on the logits only through l_t = log softmax(z_t)[y_t], so
// dloss/dz_t = (dloss/dl_t) (onehot(y_t) - softmax(z_t)): an objective is an elementwise function of
// (l_t, l_ref_t, w_t, position_t) and its derivative in l_t, written here with ATen elementwise ops (so one copy
// serves CPU and CUDA, and the fused op knows g_t = dloss/dl_t as soon as a chunk's l_t exist).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>

#include "safeshape/ops.h"
#include "token_loss.h"

namespace safeshape {
namespace {

using token::stat_dtype;

enum class Objective { kLogprob, kSft, kDssK2, kDeepToken };

Objective parse_objective(std::string_view name, c10::ArrayRef<double> params, const char* op) {
  if (name == "logprob" || name == "sft") {
    TORCH_CHECK(params.empty(), op, ": objective '", name, "' takes no params, got ", params.size());
    return name == "sft" ? Objective::kSft : Objective::kLogprob;
  }
  if (name == "dss_k2") {
    // optional second param: OpenRLHF's bound of the k2 estimate (docs/math.md#dss-kl-clamp); finite and > 0
    const bool ok = (params.size() == 1 || (params.size() == 2 && std::isfinite(params[1]) && params[1] > 0)) &&
                    params[0] >= 0;
    TORCH_CHECK(ok, op, ": objective 'dss_k2' takes params = [kl_coef >= 0] or [kl_coef, kl_clamp > 0] (kl_clamp "
                "finite), got ", params);
    return Objective::kDssK2;
  }
  if (name == "deep_token") {
    TORCH_CHECK(!params.empty(), op, ": objective 'deep_token' takes params = the betas of positions 1, 2, ... (the "
                "last one holds for every later position), got none");
    for (double b : params) TORCH_CHECK(b > 0, op, ": deep_token betas must be > 0, got ", params);
    return Objective::kDeepToken;
  }
  TORCH_CHECK(false, op, ": objective must be one of logprob, sft, dss_k2, deep_token; got '", name, "'");
}

struct Terms {
  at::Tensor loss, dloss;  // per token; dloss = d loss_t / d l_t; both 0 at ignored rows
};

// log(1 + exp(u)) without overflow
at::Tensor log1p_exp(const at::Tensor& u) { return u.clamp_min(0) + at::log1p(at::exp(-u.abs())); }

// beta_t = params[t - 1] for positions t = 1 .. k - 1, params[k - 1] after (elementwise, no host copy)
at::Tensor deep_token_betas(const at::Tensor& positions, c10::ArrayRef<double> betas, const at::Tensor& like) {
  at::Tensor beta = at::full_like(like, betas.back());
  for (size_t i = 0; i + 1 < betas.size(); ++i) {
    beta = at::where(positions.eq(static_cast<int64_t>(i + 1)), at::Scalar(betas[i]), beta);
  }
  return beta;
}

// l: logprobs [n] (statistics dtype); w, ref, positions may be undefined where the objective does not need them.
Terms objective_terms(Objective o, c10::ArrayRef<double> params, const at::Tensor& l, const at::Tensor& valid,
                      const at::Tensor& w, const at::Tensor& ref, const at::Tensor& positions) {
  Terms t;
  switch (o) {
    case Objective::kLogprob:  // loss = w l: the backward of token log-probabilities with upstream gradient w
      t.loss = w.defined() ? w * l : l;
      t.dloss = w.defined() ? w : at::ones_like(l);
      break;
    case Objective::kSft:  // loss = w (-l)
      t.loss = w.defined() ? -w * l : -l;
      t.dloss = w.defined() ? -w : at::full_like(l, -1.0);
      break;
    case Objective::kDssK2: {  // loss = w (-l) + lambda (1 - w) 0.5 (l - l_ref)^2
      const double lambda = params[0];
      const at::Tensor d = l - ref;
      if (params.size() == 1) {
        t.loss = -w * l + lambda * (1 - w) * 0.5 * d * d;
        t.dloss = -w + lambda * (1 - w) * d;
        break;
      }
      // with kl_clamp C: k2 = clamp(0.5 d^2, -C, C) as OpenRLHF's compute_approx_kl; its gradient as torch 2.14's
      // scalar clamp gives it: d strictly inside (-C, C), 0 on the bound and beyond (k2 >= 0: only C can act)
      const double c = params[1];
      const at::Tensor k2 = 0.5 * d * d;
      t.loss = -w * l + lambda * (1 - w) * k2.clamp(-c, c);
      t.dloss = -w + lambda * (1 - w) * at::where(k2.lt(c), d, at::zeros_like(d));
      break;
    }
    case Objective::kDeepToken: {  // loss = w (2 / beta) (-log sigmoid(beta (l - l_ref)))
      const at::Tensor beta = deep_token_betas(positions, params, l);
      const at::Tensor x = beta * (l - ref);
      t.loss = 2 * log1p_exp(-x) / beta;
      t.dloss = -2 * at::sigmoid(-x);
      if (w.defined()) {
        t.loss = t.loss * w;
        t.dloss = t.dloss * w;
      }
      break;
    }
  }
  t.loss = at::where(valid, t.loss, at::zeros_like(t.loss));
  t.dloss = at::where(valid, t.dloss, at::zeros_like(t.dloss));
  return t;
}

struct PerToken {
  at::Tensor weights, ref, positions;  // undefined when not given
};

PerToken per_token(Objective o, const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& ref,
                   const std::optional<at::Tensor>& positions, int64_t n, const at::Tensor& like, at::ScalarType dt,
                   const char* op) {
  PerToken p;
  if (weights) p.weights = token::row_vector(*weights, n, like, dt, op, "weights");
  if (ref) p.ref = token::row_vector(*ref, n, like, dt, op, "ref_logprobs");
  if (positions) {
    TORCH_CHECK(positions->dim() == 1 && positions->size(0) == n && !at::isFloatingType(positions->scalar_type()),
                op, ": positions must be an integer tensor of shape [", n, "], got ", positions->scalar_type(), " ",
                positions->sizes());
    check_same_device(like, "logits", *positions, "positions", op);
    p.positions = positions->to(at::kLong).contiguous();
  }
  if (o == Objective::kDssK2) {
    TORCH_CHECK(p.weights.defined() && p.ref.defined(), op, ": objective 'dss_k2' needs weights and ref_logprobs");
  }
  if (o == Objective::kDeepToken) {
    TORCH_CHECK(p.ref.defined() && p.positions.defined(), op,
                ": objective 'deep_token' needs ref_logprobs and positions");
  }
  return p;
}

at::Tensor part(const at::Tensor& t, int64_t s, int64_t m) { return t.defined() ? t.narrow(0, s, m) : t; }

std::tuple<at::Tensor, at::Tensor> token_objective_impl(const at::Tensor& logprobs, const at::Tensor& labels,
                                                   const std::optional<at::Tensor>& weights,
                                                   const std::optional<at::Tensor>& ref_logprobs,
                                                   const std::optional<at::Tensor>& positions,
                                                   c10::string_view objective, c10::ArrayRef<double> params,
                                                   int64_t ignore_index) {
  const char* op = "token_objective";
  const Objective o = parse_objective(std::string_view(objective.data(), objective.size()), params, op);
  TORCH_CHECK(logprobs.dim() == 1 && at::isFloatingType(logprobs.scalar_type()), op,
              ": logprobs must be a 1-D floating tensor, got ", logprobs.scalar_type(), " ", logprobs.sizes());
  const int64_t n = logprobs.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, op, ": labels must have shape [", n, "], got ",
              labels.sizes());
  const at::ScalarType dt = stat_dtype(logprobs);
  const PerToken p = per_token(o, weights, ref_logprobs, positions, n, logprobs, dt, op);
  const Terms t = objective_terms(o, params, logprobs.to(dt), labels.ne(ignore_index), p.weights, p.ref, p.positions);
  return {t.loss, t.dloss};
}

// The logits h @ W^T exist one chunk of rows at a time, at most this many bytes of float32-equivalent (128 MiB:
// with 256 MiB the chunk buffer kept the peak at V = 128256 just over 1/4 of the plain-torch loss's; bench/NOTES.md).
constexpr int64_t kChunkBytes = int64_t{128} << 20;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_token_loss_impl(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& positions, c10::string_view objective, c10::ArrayRef<double> params,
    int64_t ignore_index, int64_t chunk_rows, bool compute_grad, bool compute_grad_weight, bool fp32_grad_weight) {
  const char* op = "fused_linear_token_loss";
  const Objective o = parse_objective(std::string_view(objective.data(), objective.size()), params, op);
  token::check_matrix(hidden, op, "hidden");
  token::check_matrix(weight, op, "weight");
  TORCH_CHECK(weight.size(1) == hidden.size(1), op, ": weight is [vocab, hidden] = ", weight.sizes(),
              " but hidden has ", hidden.size(1), " columns");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight (", weight.scalar_type(), ") and hidden (",
              hidden.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(weight.size(0) > 0, op, ": weight must have at least one row (the vocabulary), got shape ",
              weight.sizes());
  check_same_device(hidden, "hidden", weight, "weight", op);
  TORCH_CHECK(chunk_rows >= 0, op, ": chunk_rows must be >= 0 (0 = automatic), got ", chunk_rows);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const at::ScalarType dt = stat_dtype(hidden);
  const at::Tensor lab = token::checked_labels(labels, n, vocab, ignore_index, hidden, op);
  const PerToken p = per_token(o, weights, ref_logprobs, positions, n, hidden, dt, op);
  const at::Tensor h_all = hidden.contiguous(), w = weight.contiguous();

  auto opts = h_all.options().dtype(dt);
  at::Tensor loss = at::zeros({n}, opts), lp = at::zeros({n}, opts), dl = at::zeros({n}, opts);
  at::Tensor grad_hidden = compute_grad ? at::empty_like(h_all) : h_all.new_empty({0});
  const bool wide = fp32_grad_weight && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf);
  at::Tensor grad_weight = !(compute_grad && compute_grad_weight) ? w.new_empty({0})
                           : wide ? at::zeros(w.sizes(), w.options().dtype(at::kFloat))
                                  : at::zeros_like(w);
  if (n == 0) return {loss, lp, dl, grad_hidden, grad_weight};
  const int64_t auto_rows = std::max<int64_t>(1, kChunkBytes / (vocab * 4));
  const int64_t chunk = std::max<int64_t>(1, std::min(n, chunk_rows > 0 ? chunk_rows : auto_rows));
  // One logits buffer for every chunk: a fresh one per chunk costs its page faults (or allocator churn) each time.
  at::Tensor zbuf = at::empty({chunk, vocab}, h_all.options());
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t m = std::min(chunk, n - s);
    const at::Tensor h = h_all.narrow(0, s, m), y = lab.narrow(0, s, m);
    at::Tensor z = zbuf.narrow(0, 0, m);  // [m, vocab], the only logits that exist
    at::mm_out(z, h, w.t());
    const auto [lp_c, lse_c] = safeshape::token_logprobs(z, y, ignore_index);
    const Terms t = objective_terms(o, params, lp_c, y.ne(ignore_index), part(p.weights, s, m), part(p.ref, s, m),
                                    part(p.positions, s, m));
    lp.narrow(0, s, m).copy_(lp_c);
    loss.narrow(0, s, m).copy_(t.loss);
    dl.narrow(0, s, m).copy_(t.dloss);
    if (!compute_grad) continue;
    safeshape::token_logprobs_backward_(z, t.dloss, y, lse_c, ignore_index);  // z now holds dloss/dz
    at::Tensor gh = grad_hidden.narrow(0, s, m);
    at::mm_out(gh, z, w);
    if (!compute_grad_weight) continue;
    if (wide) {
      grad_weight.addmm_(z.t().to(at::kFloat), h.to(at::kFloat));  // one rounding at the end, not one per chunk
    } else {
      grad_weight.addmm_(z.t(), h);
    }
  }
  return {loss, lp, dl, grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CompositeExplicitAutograd, m) {
  m.impl("token_objective", &token_objective_impl);
  m.impl("fused_linear_token_loss", &fused_linear_token_loss_impl);
}

}  // namespace safeshape
