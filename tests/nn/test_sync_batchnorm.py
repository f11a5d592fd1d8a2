"""SyncBatchNorm semantics of the fused layers, with two real gloo processes.

Each rank takes half of one fixed batch; the fused SETR conv-BN-ReLU stage and the fused SegFormer
decoder (both in training, synced over the two ranks) must then give, on the halves, what the
reference modules give on the whole batch in one process: outputs, input gradients, parameter
gradients summed over the ranks (what DDP all-reduces) and BatchNorm running statistics.
"""

import textwrap

import torch

DRIVER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from segformer_fast.nn.decode_head_fused import FusedAllMLPDecoder
    from segformer_fast.nn.setr_heads_fused import FusedConvBNReLU

    torch.set_num_threads(1)
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = torch.load(os.path.join(out, "inputs.pt"))
    result = {}
    for name, cls in (("stage", FusedConvBNReLU), ("decoder", FusedAllMLPDecoder)):
        d = data[name]
        m = cls(*d["args"], **d["kwargs"]).double()
        m.load_state_dict(d["state"])
        m.train()
        inputs = [t[rank::2].clone().requires_grad_() for t in d["inputs"]]  # this rank's half
        y = m(inputs[0]) if name == "stage" else m(inputs)
        y.backward(d["grad"][rank::2])
        result[name] = dict(out=y.detach(), input_grads=[t.grad for t in inputs],
                            param_grads={n: p.grad for n, p in m.named_parameters()},
                            buffers={n: b.clone() for n, b in m.named_buffers()})
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
""")


def _cases():
    from segformer_fast.nn.decode_head import AllMLPDecoder
    from segformer_fast.nn.setr_heads import ConvBNReLU

    g = torch.Generator().manual_seed(0)
    cases = {}
    stage = ConvBNReLU(5, 6, 3, 2).double()
    x = torch.randn(4, 5, 7, 9, generator=g, dtype=torch.float64)
    cases["stage"] = (stage, dict(args=(5, 6, 3, 2), kwargs={}), [x], torch.randn(4, 6, 14, 18, generator=g,
                                                                                   dtype=torch.float64))
    channels, dim, k = (4, 6, 8, 10), 12, 5
    dec = AllMLPDecoder(channels, dim, k, dropout=0.0).double()
    feats = [torch.randn(4, c, s, s + 1, generator=g, dtype=torch.float64) for c, s in zip(channels, (16, 8, 4, 2))]
    cases["decoder"] = (dec, dict(args=(channels, dim, k), kwargs=dict(dropout=0.0)), feats,
                        torch.randn(4, k, 16, 17, generator=g, dtype=torch.float64))
    with torch.no_grad():
        for m, *_ in cases.values():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_(generator=g)
                    mod.running_var.uniform_(0.5, 2.0, generator=g)
                    mod.weight.normal_(generator=g)
                    mod.bias.normal_(generator=g)
    return cases


def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path, torchrun):
    cases = _cases()
    data = {name: dict(state={k: v.clone() for k, v in m.state_dict().items()}, inputs=inputs, grad=grad, **spec)
            for name, (m, spec, inputs, grad) in cases.items()}
    torch.save(data, tmp_path / "inputs.pt")
    torchrun(DRIVER)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (ref, _, inputs, grad) in cases.items():
        ref.train()
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = ref(leaves[0]) if name == "stage" else ref(leaves)
        y.backward(grad)
        got = [r[name] for r in ranks]
        rel = TOL[name]
        for r, res in enumerate(got):
            _close(res["out"], y.detach()[r::2], rel, f"{name} output")
            for gi, leaf in zip(res["input_grads"], leaves):
                _close(gi, leaf.grad[r::2], rel, f"{name} input gradient")
        # biases before a BatchNorm get an exactly-zero gradient: errors are measured against the
        # largest parameter gradient, not against rounding noise around zero
        floor = max(p.grad.abs().max().item() for p in ref.parameters())
        for n, p in ref.named_parameters():
            _close(got[0]["param_grads"][n] + got[1]["param_grads"][n], p.grad, rel, f"{name} {n}", floor)
        for n, b in ref.named_buffers():
            for res in got:
                _close(res["buffers"][n], b, rel, f"{name} {n}")


# the conv-BN-ReLU stage keeps float64 statistics; the decoder computes its statistics in fp32 by design
TOL = {"stage": 1e-10, "decoder": 1e-5}


def _close(got, want, rel, what, floor=1e-30):
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), floor)
    assert err <= rel * scale, f"{what}: max error {err:.3g} against max |value| {scale:.3g}"
