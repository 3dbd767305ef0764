"""Shows why `mt.layers.LayerNorm` and `Transformer.embed_tokens` compute in fp32 for bf16 weights on the CPU:
torch's CPU LayerNorm and embedding kernels sum weight gradients in bf16 when the weights are bf16.

Prints, for a LayerNorm over 8,192 rows and for one token looked up 4,096 times, the summed gradient
(first element) in fp32, with torch's layer in bf16, and with mt's in bf16.

Usage: python scripts/bf16_sums.py
"""

from __future__ import annotations

import torch
from torch import nn

from mt.config import ModelConfig
from mt.layers import LayerNorm
from mt.model import Transformer


def layer_norm_bias_grad(norm: nn.LayerNorm, dtype: torch.dtype, x: torch.Tensor, grad: torch.Tensor) -> float:
    norm = norm.to(dtype)
    norm(x.to(dtype)).backward(grad.to(dtype))
    return norm.bias.grad[0].item()


def embedding_grad(model: Transformer, dtype: torch.dtype, torch_layer: bool) -> float:
    model = model.to(dtype)
    model.zero_grad()
    tokens = torch.full((4, 1024), 7)  # 4,096 look-ups of one token
    grad = torch.rand(4, 1024, model.config.d_model, generator=torch.Generator().manual_seed(0)) * 0.003
    if torch_layer:
        model.embed(tokens).backward(grad.to(dtype))
    else:  # embed_tokens scales the embeddings by sqrt(d_model): the same gradient reaches the table
        model.embed_tokens(tokens).backward((grad / model.config.d_model**0.5).to(dtype))
    return model.embed.weight.grad[7, 0].item()


def main() -> None:
    torch.manual_seed(0)
    x, grad = torch.randn(8192, 64), torch.rand(8192, 64)
    print("LayerNorm bias gradient, summed over 8,192 rows:")
    print(f"  fp32:                {layer_norm_bias_grad(nn.LayerNorm(64), torch.float32, x, grad):10.2f}")
    print(f"  torch's, bf16:       {layer_norm_bias_grad(nn.LayerNorm(64), torch.bfloat16, x, grad):10.2f}")
    print(f"  mt's, bf16:          {layer_norm_bias_grad(LayerNorm(64), torch.bfloat16, x, grad):10.2f}")
    config = ModelConfig(d_model=16, heads=2, encoder_layers=1, decoder_layers=1, d_ff=32, dropout=0.0)
    model = Transformer(config, 10)
    print("Embedding gradient of one token looked up 4,096 times (gradients of about 0.0015 each):")
    print(f"  fp32:                {embedding_grad(model, torch.float32, torch_layer=True):10.2f}")
    print(f"  torch's, bf16:       {embedding_grad(model, torch.bfloat16, torch_layer=True):10.2f}")
    print(f"  mt's, bf16:          {embedding_grad(model, torch.bfloat16, torch_layer=False):10.2f}")


if __name__ == "__main__":
    main()
