"""Hand-written fast paths of the model, one file each, each beside the plain implementation it
is tested against (tests/test_model.py):

- embedding.py: the CPU embedding backward as one `index_add_` (plain: F.embedding);
- qk_norm_rope.py: per-head RMSNorm and RoPE in one function (plain: rms_norm then apply_rope);
- cpu_attention.py: causal grouped-query attention as batched matmuls over query blocks (plain: SDPA);
- head_loss.py: the output head and cross-entropy fused in row chunks (plain: naive_head_loss);
- quantized.py: int8/int4 linear and int8 embedding modules on aten's packed kernels (plain:
  dequantize, then matmul; tests/test_compress.py).

The model (transformer.py, attention.py) chooses them once, when it is built for a device.
"""
