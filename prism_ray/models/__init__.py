"""Model loading, the one tiny-architecture factory, the classifier protocol."""
