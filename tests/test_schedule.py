import math

import pytest

from lm_pretrain.recipe import ScheduleConfig
from lm_pretrain.train.schedule import lr_multiplier


def curve(total: int, **kwargs) -> list[float]:
    cfg = ScheduleConfig(**kwargs)
    return [lr_multiplier(s, total, cfg) for s in range(total)]


def test_wsd_stages():
    lrs = curve(100, kind="wsd", warmup=10, decay=0.2, decay_shape="linear", min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(0.1)  # (0+1)/10
    assert lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])  # the stable stage
    assert lrs[99] == pytest.approx(0.1)  # decays to the floor on the last step
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_shapes_midpoint(shape):
    lrs = curve(200, kind="wsd", warmup=0, decay=100, decay_shape=shape)
    mid = lrs[100 + 49]  # progress 0.5 into the decay
    expected = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape]
    assert mid == pytest.approx(expected, abs=1e-9)


def test_cosine_and_constant():
    lrs = curve(110, kind="cosine", warmup=10, min_lr_ratio=0.0)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5, abs=1e-9)
    assert lrs[-1] < 0.01
    assert set(curve(50, kind="constant", warmup=0)) == {1.0}
