"""terarec's embedding collection inside your own model and training loop (no terarec
trainer): a small CTR model on synthetic clicks.

The collection updates its rows itself, during backward (a fused row optimizer, as
TorchRec's fused EBC does): your optimizer gets the dense parameters only. Its rows are
in ``model.state_dict()`` (in-memory tables), so ``torch.save`` / ``load_state_dict``
work as with any module.

    python examples/own_training_loop.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection

FEATURES = ["user", "ad"]


class CTRModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = HierarchicalEmbeddingBagCollection(
            [TableConfig(name="ids", dim=8, features=FEATURES)], FEATURES,
            SparseOptimConfig(kind="adagrad", lr=0.1))
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.mlp(self.ebc(kjt).values()).squeeze(1)  # logits [B]


def batch(g: torch.Generator, n: int = 256) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Clicks planted on (user + ad) parity: learnable from the ids alone."""
    users = torch.randint(0, 1000, (n,), generator=g)
    ads = torch.randint(0, 50, (n,), generator=g) + 10**12  # any int64 ids
    labels = ((users + ads) % 2).float()
    kjt = KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.cat([users, ads]),
                                              torch.ones(2 * n, dtype=torch.int64))
    return kjt, labels


def main() -> tuple[float, float]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = CTRModel()
    opt = torch.optim.Adam(model.mlp.parameters(), lr=0.01)  # dense parameters only
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(300):
        kjt, labels = batch(g)
        loss = loss_fn(model(kjt), labels)
        opt.zero_grad()
        loss.backward()  # the rows of this batch are updated here
        opt.step()
        losses.append(loss.item())
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "model.pt")  # the rows included
        again = CTRModel()
        again.load_state_dict(torch.load(Path(tmp) / "model.pt", weights_only=True))
    kjt, _ = batch(g)
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model(kjt), again(kjt))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"loss {first:.3f} -> {last:.3f}; reloaded model scores identically")
    return first, last


if __name__ == "__main__":
    main()
