"""The FLOPs per token behind the TFLOPS and MFU columns, checked against a count done by hand."""

import torch

from pytrain.config import Config
from pytrain.monitor import attention_width, flops_per_token, matmul_params
from pytrain.registry import MODEL_INITIALIZER


def test_gemma_7b_counts_attention_over_heads_times_head_dim():
    """Gemma-7B's layers (configs/gemma_7B.py), 2 of its 28 to keep the build short, at seq_len 8192, no
    recompute, by hand: per layer, wq, wk, wv: 3072 x (16 x 256 = 4096) each, wo: 4096 x 3072
    -> 4 x 12,582,912 = 50,331,648; GeGLU w1, w3, w2: 3 x 3072 x 24576 = 226,492,416; 2 layers -> P_blocks =
    2 x 276,824,064 = 553,648,128; the tied head: P_head = 256000 x 3072 = 786,432,000; attention over
    a = heads x head_dim = 4096 (not the hidden size 3072): 12 x 2 x 4096 x 8192 = 805,306,368;
    6 x P_blocks + 6 x P_head + 805,306,368 = 3,321,888,768 + 4,718,592,000 + 805,306,368."""
    cfg = Config.from_file("configs/gemma_7B.py")
    cfg.model.num_layers = 2
    with torch.device("meta"):
        model = MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model)
    assert matmul_params(model) == (553_648_128, 786_432_000)
    assert attention_width(cfg.model) == 4096
    per_token = flops_per_token(*matmul_params(model), cfg.model.num_layers, attention_width(cfg.model), 8192)
    assert per_token == 8_845_787_136
