import pytest
import torch

from tensorslim.calib.fisher import fisher_diagonal, prepare_assign
from tensorslim.errors import CalibrationError
from tensorslim.formats import parse_format
from tensorslim.methods import build_method
from tensorslim.methods.svd import FWSVD
from tensorslim.methods.welore import WeLore
from tensorslim.models import get_adapter, tiny_model


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", seed=int(torch.randint(0, 1000, ())))
    return model, get_adapter(model)


def test_fisher_matches_per_sequence_reference(tiny):
    model, adapter = tiny
    names = adapter.linear_names(model)[:3]
    batches = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(int(torch.randint(0, 999, ()))))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    full = fisher_diagonal(model, batches, names, reduce="none")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # reference: autograd per sequence, squared, summed (float64 accumulation)
    ref = {n: torch.zeros_like(model.get_submodule(n).weight, dtype=torch.float64) for n in names}
    for i in range(3):
        ws = [model.get_submodule(n).weight for n in names]
        with torch.enable_grad():
            loss = model(input_ids=batches[i:i + 1], labels=batches[i:i + 1]).loss
            grads = torch.autograd.grad(loss, ws)
        for n, gr in zip(names, grads):
            ref[n] += gr.double() ** 2
    for n in names:
        assert full[n].shape == model.get_submodule(n).weight.shape
        assert torch.allclose(full[n].double(), ref[n], rtol=1e-4, atol=1e-12)
    cols = fisher_diagonal(model, batches, names, reduce="in")
    rows = fisher_diagonal(model, batches, names, reduce="out")
    for n in names:
        assert torch.allclose(cols[n], full[n].sum(0), rtol=1e-5)
        assert torch.allclose(rows[n], full[n].sum(1), rtol=1e-5)


def test_fisher_bad_input(tiny):
    model, adapter = tiny
    with pytest.raises(CalibrationError):
        fisher_diagonal(model, torch.zeros(0, 4, dtype=torch.long), adapter.linear_names(model)[:1])


def test_prepare_assign_resolves_welore_and_fwsvd(tiny):
    model, adapter = tiny
    names = adapter.linear_names(model)
    half = len(names) // 2
    wel = build_method("welore", parse_format("lowrank:0.3"))
    fw = build_method("fwsvd", parse_format("lowrank:r2"))
    assign = {n: (wel if i < half else fw) for i, n in enumerate(names)}
    assign[names[-1]] = None
    batches = torch.randint(0, 128, (2, 10))
    out = prepare_assign(model, adapter, assign, batches)
    assert out[names[-1]] is None
    assert all(m is None or (isinstance(m, WeLore) and m.format.rank is not None) for m in (out[n] for n in names[:half]))
    assert any(out[n] is not None for n in names[:half])
    for n in names[half:-1]:
        m = out[n]
        assert isinstance(m, FWSVD) and m.fisher_weights is not None
        assert m.fisher_weights.shape == (model.get_submodule(n).weight.shape[1],)
    with pytest.raises(CalibrationError):
        prepare_assign(model, adapter, {names[0]: fw}, None)


def test_dense_grams_match_a_float64_reference_and_share_inputs(tiny):
    from tensorslim.calib.fisher import dense_grams

    model, adapter = tiny
    names = adapter.linear_names(model)
    g = torch.Generator().manual_seed(int(torch.randint(0, 999, ())))
    batches = torch.randint(0, 128, (5, 16), generator=g)
    got = dense_grams(model, batches, names, batch_size=2)
    ref = {n: 0.0 for n in names}

    def hook(n):
        def f(_m, inp, _o):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            ref[n] = ref[n] + x.T @ x
        return f
    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.inference_mode():
        model(input_ids=batches)
    for h in hs:
        h.remove()
    for n in names:
        want = ref[n] / batches.numel()
        assert torch.allclose(got[n].double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), n
    q, k = next(n for n in names if n.endswith("q_proj")), next(n for n in names if n.endswith("k_proj"))
    assert torch.equal(got[q], got[k])  # one accumulator for linears reading the same tensor


def test_prepare_assign_resolves_the_global_whitened_allocation(tiny):
    from tensorslim.calib.fisher import dense_grams
    from tensorslim.methods.welore import GlobalWhitenedSVD, allocate_ranks, whitened_spectra

    model, adapter = tiny
    names = adapter.linear_names(model)
    batches = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(int(torch.randint(0, 999, ()))))
    method = build_method("svd-whitened-global", parse_format("lowrank:0.4"))
    assert isinstance(method, GlobalWhitenedSVD)
    with pytest.raises(CalibrationError):
        prepare_assign(model, adapter, {n: method for n in names}, None)
    out = prepare_assign(model, adapter, {n: method for n in names}, batches)
    weights = {n: model.get_submodule(n).weight.detach().float() for n in names}
    want = allocate_ranks(weights, 0.4, "error", spectra=whitened_spectra(weights, dense_grams(model, batches, names)))
    assert {n: (None if m is None else m.format.rank) for n, m in out.items()} == want
