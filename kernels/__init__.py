"""Triton kernels and their plain-PyTorch references; `kernels.dispatch` picks one per device."""
