"""lorafn kernels package."""
