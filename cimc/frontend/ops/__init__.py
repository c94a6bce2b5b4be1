"""The frontend's op converters, one module per op family; each registers its converters in
`cimc.frontend.converters` (and any idiom rules it owns in `cimc.ir.rules`) on import."""

from cimc.frontend.ops import (  # noqa: F401
    attention,
    contrib_activations,
    contrib_attention,
    contrib_embedding,
    contrib_norms,
    elementwise,
    gather,
    gelu,
    layout,
    linear,
    normalization,
    qdq,
    quantized,
    reduce,
    rotary,
)
