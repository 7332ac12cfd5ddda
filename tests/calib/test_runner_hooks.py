import pytest
import torch

from tensorslim.calib.runner import forward_with_hooks
from tensorslim.models import tiny_model


def test_forward_with_hooks_sees_every_batch_and_removes_its_hooks() -> None:
    model = tiny_model("llama", seed=int(torch.randint(0, 10_000, ())))
    batches = torch.randint(0, 128, (5, 7))
    seen: list[int] = []
    norm = model.model.norm
    forward_with_hooks(model, batches, 2, [(norm, lambda _m, args: seen.append(args[0].shape[0]))])
    assert seen == [2, 2, 1]  # 5 rows, 2 at a time
    assert not norm._forward_pre_hooks


def test_forward_with_hooks_removes_its_hooks_on_error() -> None:
    model = tiny_model("llama", seed=0)

    def boom(_m, _args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        forward_with_hooks(model, torch.randint(0, 128, (2, 5)), 1, [(model.model.norm, boom)])
    assert not model.model.norm._forward_pre_hooks
