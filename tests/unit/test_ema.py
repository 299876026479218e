"""Polyak averaging of the weights (pipeline.train.ema) on a plain module; the ZeRO stages, checkpoints and the
export are exercised in tests/integration/test_engine_modes.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.train.ema import ParamEMA


def _module() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[1].bias.requires_grad = False  # frozen: not averaged
    return m


def test_average_of_a_known_weight_sequence():
    m, decay = _module(), 0.9
    w0 = m[0].weight.detach().clone()
    ema = ParamEMA(m, decay)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    seq = [torch.full_like(w0, float(t)) for t in range(1, 6)]
    for w in seq:
        with torch.no_grad():
            m[0].weight.copy_(w)
        ema.update()
    # ema_T = d^T w0 + sum_t (1 - d) d^(T - t) w_t
    expected = decay ** len(seq) * w0 + sum((1 - decay) * decay ** (len(seq) - t) * w for t, w in enumerate(seq, 1))
    torch.testing.assert_close(ema.shadow["0.weight"], expected, rtol=0, atol=1e-6)
    assert ema.updates == 5


def test_swapped_evaluates_the_average_and_restores_the_raw_weights_bit_for_bit():
    m = _module()
    ema = ParamEMA(m, 0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0 / 3)
    ema.update()
    raw = {n: p.detach().clone() for n, p in m.named_parameters()}
    x = torch.randn(2, 3)
    with ema.swapped():
        assert torch.equal(m[0].weight, ema.shadow["0.weight"])
        assert torch.equal(m[1].bias, raw["1.bias"])  # a frozen parameter is not swapped
        averaged_out = m(x)
    assert all(torch.equal(p, raw[n]) for n, p in m.named_parameters())
    assert not torch.allclose(averaged_out, m(x))


def test_save_and_load_round_trip(tmp_path):
    m = _module()
    ema = ParamEMA(m, 0.99)
    with torch.no_grad():
        m[0].weight.mul_(2)
    ema.update()
    path = ema.save(tmp_path, torch.device("cpu"))
    assert path.name == "ema.safetensors"
    other = ParamEMA(_module(), 0.99)
    assert other.load(tmp_path)
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    assert not ParamEMA(_module(), 0.99).load(tmp_path / "none")
    with pytest.raises(ValueError, match="lacks 1 trainable"):
        other.load_full_state({k: v for k, v in ema.shadow.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="decay"):
        ParamEMA(m, 1.0)
