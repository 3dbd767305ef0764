"""mt.linear: bf16 products on the CPU with their rows padded to few shapes, and the same results."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from mt import linear
from mt.config import Config
from mt.model import Transformer


def test_padded_rows_round_up_by_at_most_an_eighth():
    assert [linear.padded_rows(n) for n in (0, 1, 15, 16, 17, 1000, 1024, 1025, 2047, 2049)] == \
        [0, 1, 15, 16, 18, 1024, 1024, 1152, 2048, 2304]
    for rows in range(1, 5000):
        padded = linear.padded_rows(rows)
        assert rows <= padded < rows * 9 / 8 + 1
    assert len({linear.padded_rows(n) for n in range(1024, 4096)}) == 17  # 8 per octave, and 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_is_f_linear_in_values_and_gradients(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 347, 64, requires_grad=True)  # 1,041 rows: padded to 1,152 in bf16
    weight = torch.randn(96, 64, requires_grad=True)
    bias = torch.randn(96, requires_grad=True)
    results = []
    for function in (linear.linear, F.linear):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = function(x, weight, bias)
        out.float().square().sum().backward()
        results.append((out, x.grad, weight.grad, bias.grad))
        x.grad = weight.grad = bias.grad = None
    ours, torchs = results
    assert ours[0].shape == (3, 347, 96) and ours[0].dtype == torchs[0].dtype
    for a, b in zip(ours, torchs, strict=True):
        torch.testing.assert_close(a, b)


def test_linear_without_gradients_is_f_linear():
    """Decoding's path: no graph, the padded bf16 rows made directly."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 211, 64), torch.randn(96, 64), torch.randn(96)  # 1,055 rows -> 1,152
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, torchs = linear.linear(x, weight, bias), F.linear(x, weight, bias)
    assert ours.shape == (5, 211, 96) and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, torchs)
    with torch.no_grad():
        torch.testing.assert_close(linear.linear(x.bfloat16(), weight.bfloat16()), F.linear(x.bfloat16(),
                                                                                          weight.bfloat16()))


def _rows_multiplied(model: Transformer, src: torch.Tensor, tgt: torch.Tensor) -> list[int]:
    rows, plain = [], F.linear

    def recording(x, weight, bias=None):
        rows.append(x.numel() // x.size(-1))
        return plain(x, weight, bias)

    with mock.patch.object(linear.F, "linear", recording), torch.autocast("cpu", dtype=torch.bfloat16):
        model(src, tgt).float().sum().backward()
    return rows


def test_the_model_multiplies_padded_rows_in_bf16_only():
    torch.manual_seed(0)
    model = Transformer(Config().model, 100)
    src, tgt = torch.randint(4, 100, (7, 19)), torch.randint(4, 100, (7, 23))  # 133 and 161 rows
    rows = _rows_multiplied(model, src, tgt)
    assert len(rows) == 3 * 4 + 3 * 7 + 1  # every product: encoder layers, decoder layers, output
    assert set(rows) == {144, 176}  # steps of 16 rows from 128 to 255
    with mock.patch.object(linear, "PADDED_ROWS", False):
        assert set(_rows_multiplied(model, src, tgt)) == {133, 161}
