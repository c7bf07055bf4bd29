"""Tool calling on /v1/chat/completions: which tools a request offers and how the output is
constrained (plan.py), how calls are read from a model's text (parsers.py), and how they
stream as OpenAI's tool_calls deltas (stream.py)."""
