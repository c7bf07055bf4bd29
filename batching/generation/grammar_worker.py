"""The grammar-compile worker: a child process that builds one grammar at a time under a
memory limit, so that a grammar which explodes (llguidance's regex analysis can take time and
memory exponential in a small schema) kills this process, never the server.

Imports only the standard library and llguidance: it starts in well under a second.
Protocol, one JSON document per line: the parent writes the setup
({"tokenizer", "n_vocab", "eos", "memory_bytes", "limits"}), the worker answers {"ready": true};
then for each grammar (a JSON string) it answers {"error": ""} (usable) or {"error": "..."}.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any


def try_grammar(tokenizer: Any, grammar: str, limits: Any) -> str:
    """ "" if the grammar builds and yields its first mask; else llguidance's error."""
    import llguidance

    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
    if not matcher.is_error():
        matcher.compute_bitmask()  # the lexer's first use can blow up too
    return str(matcher.get_error()) if matcher.is_error() else ""


def main() -> None:
    import llguidance

    setup = json.loads(sys.stdin.readline())
    memory = int(setup["memory_bytes"])
    # The limit covers address space: a failed allocation aborts this process, which the
    # parent reads as "over the memory limit" (EOF on our stdout).
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    tokenizer = llguidance.LLTokenizer(
        setup["tokenizer"], n_vocab=setup["n_vocab"], eos_token=setup["eos"]
    )
    limits = llguidance.LLParserLimits(**setup["limits"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        error = try_grammar(tokenizer, json.loads(line), limits)
        print(json.dumps({"error": error}), flush=True)


if __name__ == "__main__":
    main()
