"""Analysis tools: what a model's layers do to sizes, coverage and signals."""
