import textwrap

import torch

DRIVER = textwrap.dedent("""
    import os, sys, torch
    from segformer_fast.train import TrainConfig, train

    out = sys.argv[1]
    torch.set_num_threads(1)
    cfg = TrainConfig(data="synthetic", synthetic_size=64, synthetic_train=32, synthetic_val=4, crop=64, batch=2,
                      steps=3, val_every=3, workers=0, out=os.path.join(out, "run"), progress=False)
    result = train(cfg)
    rank = int(os.environ["RANK"])
    torch.save({k: v.clone() for k, v in result["model"].state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    torch.save(result["history"], os.path.join(out, f"history{rank}.pt"))
""")


def test_two_gloo_processes_keep_identical_weights(tmp_path, torchrun):
    torchrun(DRIVER)
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:  # parameters (DDP all-reduce) and BatchNorm running statistics (synchronised batch stats)
        assert torch.equal(a[k], b[k]), k
    bn_mean = [k for k in a if k.endswith("running_mean")]
    assert bn_mean and not torch.equal(a[bn_mean[0]], torch.zeros_like(a[bn_mean[0]]))
    h0, h1 = torch.load(tmp_path / "history0.pt"), torch.load(tmp_path / "history1.pt")
    assert [h["step"] for h in h0] == [3]
    for key in ("loss", "miou", "per_class_iou"):  # averaged / summed over the ranks
        assert h0[0][key] == h1[0][key], key
    assert (tmp_path / "run" / "checkpoint.json").exists() and (tmp_path / "run" / "model.safetensors").exists()
