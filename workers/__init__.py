"""lorafn workers package."""
