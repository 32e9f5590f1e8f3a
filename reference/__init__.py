"""Plain-PyTorch DAAL (installed as ``daal_triton.reference``): the oracle and the CPU fallback."""
from .daal import (
    adaptive_margins,
    combine,
    daal_loss,
    density,
    density_hinge,
    knn_radius,
    length_term,
    line_distances,
    line_margin,
    normalize_rows,
    own_distance_sq,
    prepare,
    radius,
)
from .distance import (
    EPS, autocast_off, compute_dtype, knn, matmul_nt, pairwise_distance, pairwise_distance_sq, selected_distance,
    smallest,
)

__all__ = [
    "EPS", "adaptive_margins", "autocast_off", "combine", "compute_dtype", "daal_loss", "density",
    "density_hinge", "knn", "knn_radius", "length_term", "line_distances", "line_margin",
    "matmul_nt", "normalize_rows", "own_distance_sq", "pairwise_distance", "pairwise_distance_sq", "prepare", "radius",
    "selected_distance", "smallest",
]
