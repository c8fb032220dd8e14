"""Memory bound by construction: the chunked path never allocates anything of N×M size."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from macl_kernels import grouped_info_nce
    torch.manual_seed(0)
    N = M = 32768; D = 128
    q = torch.nn.functional.normalize(torch.randn(N, D), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(M, D), dim=1).requires_grad_()
    labels = torch.randint(0, 1000, (N,))
    warm = grouped_info_nce(q[:64], k[:64], q_labels=labels[:64], k_labels=labels[:64], impl="torch").loss
    warm.backward()
    q.grad = k.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = grouped_info_nce(q, k, q_labels=labels, k_labels=labels, impl="torch").loss
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra_bytes": after - before, "loss": loss.item(),
                      "finite": bool(torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all())}))
""")


@pytest.mark.slow
def test_torch_path_32k_never_allocates_n_by_m():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    n_by_m_fp32 = 32768 * 32768 * 4  # 4 GiB: one copy of the logits
    assert res["finite"] and res["loss"] > 0
    assert res["extra_bytes"] < n_by_m_fp32 / 16, f"peak RSS grew by {res['extra_bytes'] / 2**20:.0f} MiB"
