"""Bad input gets a ValueError/TypeError that names the bad value."""
import pytest
import torch

from macl_kernels import dense_info_nce, grouped_info_nce, info_nce, nt_xent, positional_sup_con, sup_con

q = torch.randn(6, 4)


@pytest.mark.parametrize("tau, match", [(0.0, "got 0.0"), (-0.1, "got -0.1"), (float("nan"), "got nan"),
                                        (float("inf"), "got inf"), (torch.tensor(-1.0), "got -1.0")])
def test_temperature_must_be_positive_and_finite(tau, match):
    with pytest.raises(ValueError, match=match):
        grouped_info_nce(q, temperature=tau)


def test_temperature_type_and_shape():
    with pytest.raises(TypeError, match="str"):
        grouped_info_nce(q, temperature="0.1")
    with pytest.raises(ValueError, match=r"0-d, got shape \(2,\)"):
        grouped_info_nce(q, temperature=torch.tensor([0.1, 0.2]))


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(1, 6, 4\).*\(1, 6, 5\)"):
        grouped_info_nce(q, torch.randn(6, 5))
    with pytest.raises(ValueError, match="G and D"):
        grouped_info_nce(torch.randn(2, 6, 4), torch.randn(3, 6, 4))
    with pytest.raises(ValueError, match="must both be 2-D"):
        grouped_info_nce(q, torch.randn(1, 6, 4))
    with pytest.raises(ValueError, match=r"z1 and z2.*\(6, 4\).*\(5, 4\)"):
        nt_xent(q, torch.randn(5, 4))
    with pytest.raises(ValueError, match="N ≤ M"):
        grouped_info_nce(q, torch.randn(3, 4))


def test_integer_features_and_dtype_mismatch():
    with pytest.raises(TypeError, match="torch.int64"):
        grouped_info_nce(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="float32 and torch.float64"):
        grouped_info_nce(q, q.double())
    with pytest.raises(TypeError, match="int32"):
        sup_con(torch.ones(4, 2, dtype=torch.int32), torch.zeros(4, dtype=torch.long))


def test_labels_and_positions_shape_and_dtype():
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\).*\(5,\)"):
        sup_con(q, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="q_labels must be an integer tensor, got torch.float32"):
        sup_con(q, torch.zeros(6))
    with pytest.raises(TypeError, match="q_positions must be a floating-point tensor, got torch.int64"):
        positional_sup_con(q, torch.zeros(6, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match=r"positions must have shape \(6,\) for features \(6, 4\), got \(6, 1\)"):
        positional_sup_con(q, torch.zeros(6, 1), 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        positional_sup_con(q, torch.tensor([0.1, float("nan"), 0, 0, 0, 0]), 0.1)


@pytest.mark.parametrize("thr", [0.0, -1.0, float("nan"), None])
def test_threshold_must_be_positive(thr):
    with pytest.raises(ValueError, match=f"got {thr!r}" if thr is not None else "got None"):
        grouped_info_nce(q, q_positions=torch.rand(6), threshold=thr)


def test_pos_index_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, M=7\), got values in \[0, 7\]"):
        info_nce(q, torch.randn(7, 4), torch.tensor([0, 1, 2, 3, 4, 7]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\]"):
        info_nce(q, torch.randn(7, 4), torch.tensor([0, 1, 2, -1, 0, 0]))


def test_several_rules_and_masks():
    with pytest.raises(ValueError, match="pos_index and labels"):
        grouped_info_nce(q, pos_index=torch.arange(6), q_labels=torch.arange(6))
    with pytest.raises(TypeError, match="bool tensor, got torch.int64"):
        grouped_info_nce(q, q_valid=torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"k_valid must have shape \(6,\)"):
        grouped_info_nce(q, k_valid=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="negatives must be one of"):
        dense_info_nce(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), negatives="pixel")
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 3, 3\)"):
        dense_info_nce(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), torch.ones(3, 3, dtype=torch.bool))


def test_unknown_reduction_and_impl():
    with pytest.raises(ValueError, match="'avg'"):
        grouped_info_nce(q, reduction="avg")
    with pytest.raises(ValueError, match="'cuda'"):
        grouped_info_nce(q, impl="cuda")


def test_different_devices():
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="same device"):
        grouped_info_nce(q, torch.randn(6, 4, device=meta))
    with pytest.raises(ValueError, match="q_labels is on meta"):
        grouped_info_nce(q, q_labels=torch.zeros(6, dtype=torch.long, device=meta))


def test_triton_where_it_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' cannot run here: .*CUDA"):
        grouped_info_nce(q, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="float64"):
        grouped_info_nce(q.double(), impl="triton")
