import torch

from terarec.config import InitConfig
from terarec.ps.initializer import init_rows


def test_pure_function_of_key_and_seed() -> None:
    keys = torch.tensor([3, -7, 2**40])
    cfg = InitConfig(kind="uniform", scale=0.1)
    a = init_rows(keys, 8, cfg, seed=1)
    b = init_rows(keys.flip(0), 8, cfg, seed=1).flip(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, init_rows(keys, 8, cfg, seed=2))
    assert a.abs().max() <= 0.1


def test_distributions() -> None:
    keys = torch.arange(20_000)
    u = init_rows(keys, 16, InitConfig(kind="uniform", scale=1.0), seed=0)
    assert abs(u.mean()) < 0.01 and abs(u.var() - 1 / 3) < 0.01
    n = init_rows(keys, 16, InitConfig(kind="normal", scale=2.0), seed=0)
    assert abs(n.mean()) < 0.02 and abs(n.std() - 2.0) < 0.02
    assert torch.count_nonzero(init_rows(keys, 4, InitConfig(kind="zeros"), 0)) == 0
