"""lorafn storage package."""
