"""Run llama-cpp-python's OpenAI-compatible server with prefix-cache reuse turned off.

The server keeps the previous request's KV cache and re-evaluates only the new suffix of a
prompt. Logits computed that way differ from a fresh evaluation in the last bits, which is
enough to flip near-ties between the top tokens from one request to the next. Resetting the
model before every generation makes each request evaluate its whole prompt, so the same
request always gets the same answer.

Usage: ``python llama_server.py --model FILE --host 127.0.0.1 --port PORT [server flags]``
(the flags of ``python -m llama_cpp.server``).

With ``$TOWLINE_GENERATED_LOG`` set to a file, every generation appends a line with the number
of tokens the model generated for it (one forward pass each), so that a benchmark can read
what a client's requests really cost, also for streams the client stopped reading early.
"""

import functools
import os
import sys

import llama_cpp
from llama_cpp.server.__main__ import main

_generate = llama_cpp.Llama.generate


_LOG = os.environ.get("TOWLINE_GENERATED_LOG")


@functools.wraps(_generate)
def _generate_from_scratch(self, *args, **kwargs):
    self.reset()
    if not _LOG:
        return _generate(self, *args, **kwargs)
    return _logged(_generate(self, *args, **kwargs))


def _logged(tokens):
    generated = 0
    try:
        for token in tokens:
            generated += 1
            yield token
    finally:
        with open(_LOG, "a") as log:
            log.write(f"{generated}\n")


llama_cpp.Llama.generate = _generate_from_scratch

if __name__ == "__main__":
    sys.exit(main())
