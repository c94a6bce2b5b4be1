"""Design-space exploration: which hardware to search (`space`), the search (`search`) and its store (`store`)."""
