"""Linear inverse problems with the flat or the multi-scale prior (method.md §7).

``operators``: measurement operators M^T with orthonormal columns; ``solver``: ``solve``.
"""
from wcdm_jax.inverse.operators import (BlockAverage, Inpainting, Operator, RandomPixels,
                                        RandomProjection, SpectralLowpass, box_mask)
from wcdm_jax.inverse import operators, solver
from wcdm_jax.inverse.solver import (DEFAULT_ASCENT, ORIGINAL, SolverConfig, check_problem,
                                     constrained_ascent, default_sampler, solve)

__all__ = ["BlockAverage", "DEFAULT_ASCENT", "Inpainting", "ORIGINAL", "Operator", "RandomPixels",
           "RandomProjection", "SolverConfig", "SpectralLowpass", "box_mask", "check_problem",
           "constrained_ascent", "default_sampler", "solve"]
