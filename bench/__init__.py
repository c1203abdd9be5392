"""lorafn bench package."""
