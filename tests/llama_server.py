"""Run llama-cpp-python's OpenAI-compatible server with prefix-cache reuse turned off.

The server keeps the previous request's KV cache and re-evaluates only the new suffix of a
prompt. Logits computed that way differ from a fresh evaluation in the last bits, which is
enough to flip near-ties between the top tokens from one request to the next. Resetting the
model before every generation makes each request evaluate its whole prompt, so the same
request always gets the same answer.

Usage: ``python llama_server.py --model FILE --host 127.0.0.1 --port PORT [server flags]``
(the flags of ``python -m llama_cpp.server``).
"""

import functools
import sys

import llama_cpp
from llama_cpp.server.__main__ import main

_generate = llama_cpp.Llama.generate


@functools.wraps(_generate)
def _generate_from_scratch(self, *args, **kwargs):
    self.reset()
    return _generate(self, *args, **kwargs)


llama_cpp.Llama.generate = _generate_from_scratch

if __name__ == "__main__":
    sys.exit(main())
