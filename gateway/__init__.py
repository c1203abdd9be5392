"""lorafn gateway package."""
