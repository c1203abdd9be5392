"""lorafn lorafn package."""
