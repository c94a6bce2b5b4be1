"""Design-space exploration: which hardware to search (`space`), and later the search itself."""
