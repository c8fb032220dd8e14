#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <algorithm>

using Vec = at::vec::Vectorized<float>;

// S_i += sum_j exp(q_i . k_j - bound_i) over key blocks; q already scaled by s. One GEMM into a
// per-thread L2-sized buffer, then the exp-and-row-sum epilogue while the block is in cache.
torch::Tensor fwd_rowsum(torch::Tensor q, torch::Tensor k, torch::Tensor bound, int64_t br, int64_t bc) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && q.is_contiguous() && k.is_contiguous());
  const int64_t N = q.size(0), M = k.size(0);
  auto S = torch::zeros({N}, q.options());
  float* Sp = S.data_ptr<float>();
  const float* bp = bound.data_ptr<float>();
  const int64_t nblocks = (N + br - 1) / br;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    auto buf = torch::empty({br, bc}, q.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * br, rn = std::min(N, r0 + br) - r0;
      auto qt = q.narrow(0, r0, rn);
      for (int64_t c0 = 0; c0 < M; c0 += bc) {
        const int64_t cn = std::min(M, c0 + bc) - c0;
        auto out = buf.narrow(0, 0, rn).narrow(1, 0, cn);
        at::mm_out(out, qt, k.narrow(0, c0, cn).t());
        const float* op = buf.data_ptr<float>();
        for (int64_t i = 0; i < rn; ++i) {
          const float* row = op + i * bc;
          const Vec bi(bp[r0 + i]);
          Vec acc(0.f);
          int64_t j = 0;
          for (; j + Vec::size() <= cn; j += Vec::size())
            acc = acc + (Vec::loadu(row + j) - bi).exp_u20();
          alignas(64) float tmp[Vec::size()];
          acc.store(tmp);
          float s = 0.f;
          for (int64_t t = 0; t < Vec::size(); ++t) s += tmp[t];
          for (; j < cn; ++j) s += std::exp(row[j] - bp[r0 + i]);
          Sp[r0 + i] += s;
        }
      }
    }
  });
  return S;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("fwd_rowsum", &fwd_rowsum); }
