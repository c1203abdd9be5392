"""lorafn protocol package."""
