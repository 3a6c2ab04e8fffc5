"""The `@triton.jit` code of the FlashTPA kernels; the launchers (`flashtpa.triton_decode`, `flashtpa.triton_prefill`)
choose launch parameters, allocate outputs and build grids."""
