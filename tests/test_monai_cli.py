"""MONAI networks end to end: `macl pretrain --net monai:DynUNet` → `macl finetune` → `macl evaluate` on the
phantom data (in process, small), the exported file loading into a fresh DynUNet by value, the docs/monai.md
fine-tuning example run as written, and one-line CLI errors for a bad network."""
import json
import re
from pathlib import Path

import pytest
import torch

from macl import cli
from macl.data import PhantomConfig, write_phantom_dataset

REPO = Path(__file__).resolve().parent.parent
DYN = {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds",
                                 PhantomConfig(n_subjects=6, shape=(32, 32, 16), seed=3))


def test_pretrain_finetune_evaluate_dynunet_from_the_cli(data, tmp_path, capsys):
    from monai.networks.nets import DynUNet
    run, ft = tmp_path / "pre", tmp_path / "ft"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--net", "monai:DynUNet",
                     "--net-args", json.dumps(DYN), "--patch-size", "32", "--batch-size", "4", "--steps", "2",
                     "--device", "cpu", "--no-progress"]) == 0
    assert "pre-training done: 2 steps" in capsys.readouterr().out
    resolved = json.loads((run / "resolved_config.json").read_text())["pretrain"]["net"]
    assert resolved["arch"] == "monai:DynUNet" and resolved["arch_args"] == DYN
    sd = torch.load(run / "pretrained_weights.pt", weights_only=True)
    side = json.loads((run / "pretrained_weights.json").read_text())
    assert side["missing_keys"] == ["output_block.conv.conv.bias", "output_block.conv.conv.weight"]
    fresh = DynUNet(spatial_dims=2, in_channels=1, out_channels=7, **DYN)
    res = fresh.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == [] and sorted(res.missing_keys) == side["missing_keys"]
    ckpt = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    for k, v in sd.items():  # the values of the final checkpoint, under the network's own names
        assert torch.equal(fresh.state_dict()[k], v) and torch.equal(ckpt["model"]["model.net." + k], v), k

    assert cli.main(["finetune", "--data", str(data), "--out", str(ft), "--pretrained", str(run / "pretrained_weights.pt"),
                     "--labels-fraction", "0.5", "--steps", "2", "--batch-size", "2", "--patch-size", "32",
                     "--no-progress"]) == 0
    assert "fine-tuning done" in capsys.readouterr().out
    saved = json.loads((ft / "resolved_config.json").read_text())["net"]
    assert saved["arch"] == "monai:DynUNet" and saved["arch_args"] == DYN  # read from the weights' .json
    assert sorted(json.loads((ft / "pretrained_load.json").read_text())["loaded"]) == sorted(sd)
    first = json.loads((ft / "summary.json").read_text())
    (ft / "summary.json").unlink()
    assert cli.main(["evaluate", "--run", str(ft), "--data", str(data), "--no-progress"]) == 0
    assert json.loads((ft / "summary.json").read_text())["mean"] == first["mean"]
    model = torch.load(ft / "model_final.pt", weights_only=True)
    assert "output_block.conv.conv.weight" in model  # the fine-tuned network is the DynUNet itself


@pytest.mark.parametrize("args, message", [
    (["--net", "monai:DynUNet", "--net-args", "[1, 2]"], "expected a JSON object"),
    (["--net", "monai:DenseNet121"], "net 'monai:DenseNet121' has no MACL tap map"),
    (["--net", "monai:DynUNet", "--net-args", json.dumps({**DYN, "in_channels": 3})], "may not set ['in_channels']"),
    (["--net", "monai:DynUNet", "--net-args", json.dumps(DYN), "--patch-size", "16"],
     "MACL on DynUNet at patch 16x16: the dominant bottleneck (module 'bottleneck') is 1x1"),
])
def test_bad_network_settings_are_one_line(data, tmp_path, capsys, args, message):
    code = None
    try:
        code = cli.main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--batch-size", "2",
                         "--steps", "1", "--device", "cpu", "--no-progress", *args])
    except SystemExit as e:  # argparse type errors
        code = e.code
    err = capsys.readouterr().err
    assert code != 0 and message in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and not (tmp_path / "r" / "checkpoints").exists()


def doc_block(path: Path, marker: str) -> str:
    """The ```python block of a Markdown file that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{len(found)} python blocks with {marker!r} in {path}"
    return found[0]


def test_docs_example_runs(tmp_path, capsys):
    """Pre-train the docs' DynUNet for a step with the Python API, export, then run docs/monai.md's loop."""
    from monai.networks.nets import DynUNet
    from macl.methods import Batch
    from macl.nets import adapt
    from macl.settings.config import PretrainConfig, TrainConfig
    from macl.train import export_weights, pretrain
    code = doc_block(REPO / "docs" / "monai.md", "DiceCELoss")
    args = eval(re.search(r"args = (dict\(.*?\))\n", code).group(1))  # the doc's own network arguments
    torch.manual_seed(0)
    method = adapt(DynUNet(spatial_dims=3, in_channels=1, out_channels=2, **args))
    x = torch.rand(2, 1, 64, 64, 64)
    cfg = PretrainConfig(train=TrainConfig(steps=1, device="cpu", checkpoint_every=0, diagnostics=False))
    res = pretrain(cfg, [Batch(torch.tensor([0.2, 0.7]), x, x.flip(2), x, x.flip(3))], str(tmp_path / "run"),
                   method=method)
    weights = str(tmp_path / "pretrained_weights.pt")
    out = export_weights(res.checkpoint, weights)
    assert out["missing_keys"] and all(k.startswith(("upsamples.2.", "output_block.", "skip_layers.upsample."))
                                    for k in out["missing_keys"])
    g = torch.Generator().manual_seed(0)
    loader = [(torch.rand(2, 1, 32, 32, 32, generator=g), torch.randint(0, 3, (2, 1, 32, 32, 32), generator=g))
              for _ in range(2)]
    scope = {"weights": weights, "loader": loader}
    exec(compile(code, "docs/monai.md", "exec"), scope)
    net, sd = scope["net"], torch.load(weights, weights_only=True)
    assert float(scope["loss"].detach()) > 0 and len(sd) == len(out["state_dict"])
    assert f"{len(sd)} pre-trained tensors" in capsys.readouterr().out


def test_finetune_a_monai_net_from_scratch_with_the_net_flags(data, tmp_path, capsys):
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--data", str(data), "--out", str(ft), "--net", "monai:DynUNet", "--net-args",
                     json.dumps(DYN), "--steps", "1", "--batch-size", "2", "--patch-size", "32", "--no-evaluate",
                     "--no-progress"]) == 0
    assert "fine-tuning done (from scratch" in capsys.readouterr().out
    assert json.loads((ft / "resolved_config.json").read_text())["net"]["arch_args"] == DYN
    assert "output_block.conv.conv.weight" in torch.load(ft / "model_final.pt", weights_only=True)


def test_pcl_pretrains_a_basicunet_encoder_from_the_cli(data, tmp_path, capsys):
    run = tmp_path / "pcl"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--method", "pcl", "--net", "monai:BasicUNet",
                     "--net-args", json.dumps({"features": [4, 4, 8, 8, 16, 4]}), "--patch-size", "32",
                     "--batch-size", "4", "--steps", "1", "--device", "cpu", "--no-progress"]) == 0
    sd = torch.load(run / "pretrained_weights.pt", weights_only=True)
    assert {k.split(".")[0] for k in sd} == {"conv_0", "down_1", "down_2", "down_3", "down_4"}  # the encoder only
