import torch

from tensorslim.inspect_spectra import energy_rank, inspect_spectra
from tensorslim.models import get_adapter, tiny_model


def test_energy_rank_exact():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.9) == 2  # 13/14 = 0.93
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(s, 0.99) == 3


def test_inspect_spectra_tiny_model(tmp_path):
    model = tiny_model("qwen2", seed=int(torch.randint(0, 1000, ())))
    adapter = get_adapter(model)
    png = tmp_path / "spectra.png"
    rows = inspect_spectra(model, adapter, png)
    names = adapter.linear_names(model)
    assert [r["name"] for r in rows] == names
    for r in rows:
        w = model.get_submodule(r["name"]).weight.detach().double()
        s = torch.linalg.svdvals(w)
        assert r["rank_90"] <= r["rank_95"] <= r["rank_99"] <= r["full_rank"] == min(w.shape)
        k = r["rank_95"]
        assert float(s[:k].square().sum() / s.square().sum()) >= 0.95 - 1e-6
        assert float(s[:k - 1].square().sum() / s.square().sum()) < 0.95 + 1e-6
        assert r["welore_class"] in ("LRC", "N-LRC")
        assert (r["welore_rank"] is None) == (r["welore_class"] == "N-LRC")
    assert any(r["welore_class"] == "LRC" for r in rows)
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
