"""lorafn scheduler package."""
