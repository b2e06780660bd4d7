"""The update a CUDA graph replays (`graph_adam`) is torch's Adam's, schedule and all (on CPU)."""

from __future__ import annotations

import pytest
import torch

from mnist_exp.training.graph_adam import GraphAdam, unsupported
from mnist_exp.training.networks import ConvNet


def _train(optimizer_class: type, graphed_steps: set[int], **options) -> dict:
    """Eight steps of a one-cycle schedule on fixed batches; the steps in `graphed_steps` by
    `GraphAdam`, the others by torch's own step (as an epoch's short last batch is)."""
    torch.manual_seed(0)
    # No BatchNorm: a bias before one gets gradients of rounding noise, which Adam amplifies.
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    optimizer = optimizer_class(model.parameters(), lr=0.01, **options)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=8)
    update = GraphAdam(optimizer) if graphed_steps else None
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        images = torch.randn(16, 1, 28, 28, generator=g)
        labels = torch.randint(0, 10, (16,), generator=g)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        if update is not None and step in graphed_steps:
            update.load_hyperparameters()
            update.step()
        else:
            optimizer.step()
        scheduler.step()
    return model.state_dict()


@pytest.mark.parametrize(
    ("optimizer_class", "options"),
    [
        (torch.optim.Adam, {}),
        (torch.optim.Adam, {"weight_decay": 0.01}),
        (torch.optim.AdamW, {"weight_decay": 0.01}),
    ],
)
@pytest.mark.parametrize("graphed_steps", [set(range(8)), {0, 1, 2, 4, 5, 6}])
def test_graph_adam_steps_as_torch_adam_with_a_one_cycle_schedule(
    optimizer_class, options, graphed_steps
):
    """OneCycleLR moves the learning rate and beta1 each step; both reach the update."""
    expected = _train(optimizer_class, set(), **options)
    got = _train(optimizer_class, graphed_steps, **options)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_graph_adam_says_which_optimizers_it_cannot_stand_in_for():
    params = ConvNet().parameters()
    assert unsupported(torch.optim.Adam(params)) is None
    assert "SGD" in unsupported(torch.optim.SGD(ConvNet().parameters(), lr=0.1))
    assert "amsgrad" in unsupported(torch.optim.Adam(ConvNet().parameters(), amsgrad=True))
