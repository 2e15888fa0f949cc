"""The maths, as pure functions of shapes and tensors (nothing here knows PEFT or nn.Module): the DCT
(``dct``, its FFT tables ``fft_tables`` and the fused CUDA kernel ``triton_kernels``), the random
orthonormal control basis (``bases``), index sets (``layouts``, seeded by ``stable_random``, saved by
``index_codec``), and the coefficient space that puts them together (``coefficient_space``)."""
