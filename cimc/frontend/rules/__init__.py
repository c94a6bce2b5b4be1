"""The frontend's idiom rules (level "onnx" in `cimc.ir.rules`): idioms whose recognition needs
ONNX facts (head splits, folded per-position tables, masks). One module per idiom; each registers
its rule on import."""

from cimc.frontend.rules import attention, norm, rope  # noqa: F401
