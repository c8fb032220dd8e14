"""Cross-device negatives (macl_kernels.distributed): 2 gloo ranks on CPU against one process.

One spawn of 2 ranks (dist_worker.worker) runs every case; each test below checks one property of the saved
results against the single-process loss over the concatenated batch, computed here from the same seeds:
- the MEAN over ranks of the distributed loss is the single-process loss ("none": the ranks' rows are its rows);
- the gradient of each rank's inputs is world_size × the single-process gradient of those rows ("none": 1 ×),
  and a learnable τ's gradient averaged over ranks is the single-process one: what DDP's averaging needs;
- under DistributedDataParallel the averaged parameter gradient is the single-process gradient;
- a group of one rank gives exactly the result of no distribution;
- the errors: process group not initialised, ranks disagreeing on D / dtype / mask, one rank's bad input.
"""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_worker
from dist_worker import CASES, D, ddp_inputs, global_inputs, rank_inputs, run_case
from macl_kernels import gather_with_grad, nt_xent

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    mp.spawn(dist_worker.worker, args=(WORLD, str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]


def _close(got, want, dtype, what):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradients_match_single_process(ranks, name):
    loss_name, layout, sizes, kw, dtype = CASES[name]
    ref = run_case(name, global_inputs(name, WORLD), None)
    got = [r["cases"][name] for r in ranks]
    if kw.get("reduction", "mean") == "none":
        # each rank returns its own rows; (2, B, ...) layouts have the batch in dim 1
        bdim = 1 if ref["loss"].dim() > 0 and (loss_name == "nt_xent" or kw.get("symmetric")) else 0
        _close(torch.cat([g["loss"] for g in got], dim=bdim), ref["loss"], dtype, "per-anchor loss")
        scale = 1
    else:
        _close(torch.stack([g["loss"] for g in got]).mean(), ref["loss"], dtype, "mean over ranks of the loss")
        scale = WORLD
    for key, want in ref["grads"].items():
        rows = [rank_inputs(name, r)[key].shape[0] for r in range(WORLD)]
        for r, part in enumerate(want.split(rows)):
            _close(got[r]["grads"][key] / scale, part, dtype, f"rank {r}'s gradient of {key}")
    if ref["tau_grad"] is not None:
        _close(torch.stack([g["tau_grad"] for g in got]).mean(), ref["tau_grad"], dtype, "τ gradient (DDP mean)")


def test_negatives_come_from_every_rank(ranks):
    """The distributed loss is not the average of the ranks' local losses (the test above can fail)."""
    local = torch.stack([nt_xent(**rank_inputs("nt_xent", r), impl="torch") for r in range(WORLD)]).mean()
    dist_mean = torch.stack([r["cases"]["nt_xent"]["loss"] for r in ranks]).mean()
    assert abs(float(local - dist_mean)) > 1e-3


def test_ddp_gradient_is_single_process_gradient(ranks):
    torch.manual_seed(7)
    model = torch.nn.Linear(4, D).double()
    xs = [ddp_inputs(r) for r in range(WORLD)]
    z1 = torch.cat([model(x[:x.shape[0] // 2]) for x in xs])
    z2 = torch.cat([model(x[x.shape[0] // 2:]) for x in xs])
    loss = nt_xent(z1, z2, impl="torch")
    loss.backward()
    for r in ranks:
        _close(r["ddp"]["weight_grad"], model.weight.grad, torch.float64, "DDP weight gradient")
        _close(r["ddp"]["bias_grad"], model.bias.grad, torch.float64, "DDP bias gradient")
    _close(torch.stack([r["ddp"]["loss"] for r in ranks]).mean(), loss.detach(), torch.float64, "DDP loss")


def test_world_size_one_changes_nothing(ranks):
    for r in ranks:
        for name, (grouped, plain) in r["world1"].items():
            assert torch.equal(grouped["loss"], plain["loss"]), name
            for key in plain["grads"]:
                assert torch.equal(grouped["grads"][key], plain["grads"][key]), (name, key)
            if plain["tau_grad"] is not None:
                assert torch.equal(grouped["tau_grad"], plain["tau_grad"]), name


def test_bytes_sent_are_counted_from_tensor_sizes(ranks):
    """nt_xent, B = 3 per rank, D = 5, float64: 2B·D·8 = 240 bytes of keys out, 240 of gradients back."""
    for r in ranks:
        calls = {(op, what): b for op, what, b in r["comm"]}
        assert calls[("all_gather", "keys")] == (WORLD - 1) * 6 * D * 8
        assert calls[("reduce_scatter", "keys")] == (WORLD - 1) * 6 * D * 8
        assert ("all_reduce", "count") in calls


def test_ranks_disagreeing_on_d(ranks):
    for r in ranks:
        msg = r["errors"]["D"]
        assert msg.startswith("ValueError") and "feature dimension D" in msg and "rank 1: 6" in msg, msg


def test_ranks_disagreeing_on_dtype(ranks):
    for r in ranks:
        msg = r["errors"]["dtype"]
        assert msg.startswith("TypeError") and "torch.float32" in msg and "torch.float64" in msg, msg


def test_ranks_disagreeing_on_mask(ranks):
    for r in ranks:
        assert r["errors"]["mask"].startswith("ValueError") and "k_valid" in r["errors"]["mask"]


@pytest.mark.parametrize("case", ["local", "local_image"])
def test_one_rank_bad_input_stops_every_rank(ranks, case):
    assert ranks[1]["errors"][case].startswith(("TypeError", "ValueError")), ranks[1]["errors"][case]
    msg = ranks[0]["errors"][case]
    assert msg.startswith("RuntimeError") and "rank(s) [1]" in msg, msg
    assert ranks[0]["errors"]["after"] == "no error" and ranks[1]["errors"]["after"] == "no error"


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="a process group exists here")
def test_not_initialised_is_a_clear_error():
    z = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="not initialised"):
        nt_xent(z, z, process_group="world")
    with pytest.raises(RuntimeError, match="not initialised"):
        gather_with_grad(z)
    with pytest.raises(ValueError, match="'everyone'"):
        nt_xent(z, z, process_group="everyone")
    with pytest.raises(TypeError, match="int"):
        nt_xent(z, z, process_group=3)
