"""/predict: the predictor (one forward pass), the response cache, the batcher front, routes."""
