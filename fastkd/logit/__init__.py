"""Logit knowledge distillation: reference, autograd/dispatch, Triton kernel."""
