"""The weight arithmetic, which knows no configuration: QuantizationArgs and schemes in,
the bytes compressed-tensors would produce out. Bottom up, each module imports only
those above it in this list:

* `kinds`: the kind of quantizer of a scheme's weights (`QuantKind`, one registry),
  the FP4 grid, the compressed-tensors format of a scheme;
* `geometry`: where scale elements lie, which matrices the kernels take;
* `bits`: float32 and bfloat16 bits inside compiled loops;
* `mse_kernel`, `code_kernel`: numba loops of the MSE search, and of codes and min-max;
* `observers`: min-max, and the MSE search with its stop rule;
* `routes`: one chunk's compressed state dict, by shorter routes to compressed-tensors' bytes;
* `compress`: quantize and compress whole weights, in row chunks on every core.
"""
