"""Properties of the weighted low-rank routine on real SmolLM2-135M layers and activations (slow)."""

import pytest
import torch

from tensorslim.formats import IntGroup, quantize_rtn
from tensorslim.methods.eora import EoRA
from tensorslim.methods.lowrank import weighted_error, weighted_lowrank, whitening
from tensorslim.stats import LayerStats


@pytest.mark.slow
def test_whitened_and_eora_on_real_layers():
    from tensorslim.models import get_adapter, load_model

    model, _ = load_model("smollm2-135m")
    adapter = get_adapter(model)
    names = adapter.linear_names(model)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    picks = [names[int(i)] for i in torch.randint(0, len(names), (2,), generator=g)]
    grams: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, inp, out, n=n: grams.__setitem__(n, inp[0].reshape(-1, inp[0].shape[-1]).double().T
                                                   @ inp[0].reshape(-1, inp[0].shape[-1]).double())) for n in picks]
    ids = torch.randint(0, 49152, (1, 256), generator=g)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    for n in picks:
        w = model.get_submodule(n).weight.detach().double()
        h = grams[n]
        r = int(torch.randint(8, 64, (), generator=g))
        uw, vw = weighted_lowrank(w, r, whiten=whitening(h, damp=0.0, layer=n))
        up, vp = weighted_lowrank(w, r)
        assert weighted_error(w, uw.double() @ vw.double(), h) <= weighted_error(w, up.double() @ vp.double(), h) * 1.001
        base = quantize_rtn(w.float(), IntGroup(bits=3, group_size=64))
        cw = EoRA(rank=r, dtype="float32").apply(w.float(), base, LayerStats(n_tokens=256, gram=h.float()), layer=n)
        resid = w - base.decode().double()
        ur, vr = weighted_lowrank(resid, r)
        assert weighted_error(w, cw.decode().double(), h) <= weighted_error(resid, ur.double() @ vr.double(), h) * 1.001
        assert weighted_error(w, cw.decode().double(), h) < weighted_error(w, base.decode().double(), h)
