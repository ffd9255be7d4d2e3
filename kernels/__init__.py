"""Triton kernels and their launchers, installed as ``vitkern.kernels`` (no autograd, no modules here)."""
