"""Kernels used by visionzoo models: one sub-package per operation (see DESIGN.md §3)."""
