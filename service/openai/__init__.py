"""The OpenAI-compatible /v1 API: schemas, request translation, error shapes, routes."""
