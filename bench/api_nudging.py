"""Nudging over an API: what towline asks of the servers per answer, against the plain
full-chunk transcription of the rules (bench/spec_nudging.py), on the same llama.cpp servers.

    python bench/api_nudging.py [--questions 5] [--max-tokens 48]

Starts two llama-cpp-python servers (tests/llama_server.py: every prompt evaluated from
scratch, one thread each), one for the base and one for the guide, and answers the first
GSM8K questions (the copy bundled with towline) with both implementations, greedy. Both must
give the same rounds and texts. Counted per answer, for each implementation:

- ``requests``: every HTTP request, by path (completions, and the ``/extras/tokenize``
  requests that count nudging words in base tokens); the transcription counts each distinct
  text once, as any implementation would, on the server; towline with the model's own
  tokenizer, as ``load_model`` sets it up (checked against the server once);
- ``generated``: tokens the servers generated (each a forward pass), as the servers log them
  (``$TOWLINE_GENERATED_LOG``): a stream that towline stops reading still costs what the
  server generated before it saw the client leave;
- ``received``: generated tokens that came back to the client.

``ratio`` is towline's figure divided by the transcription's, for requests and for generated
tokens (the target is 0.5 or less for both). ``ratio_adaptive`` is the same for towline with
``adapt_proposals`` (off the rules: each guide proposal as long as the base needed of the last
one, plus two tokens), whose answers may differ: ``adaptive_same_texts`` says which did not.

The models are SmolLM2-135M-Instruct for both roles, on a plain prompt as the base and on its
chat prompt as the guide, as tests/methods/test_nudging_spec.py does: the bundled base,
gemma-3-270m, has a 262k vocabulary, and llama-cpp-python sorts all of it in Python at every
token to report log-probs, which makes a Gemma base about 8x slower here.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from towline.eval import datasets
from towline.methods.nudging import nudge
from towline.models import registry
from towline.models.openai import OpenAIModel
from towline.prompts import build_prompt

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tests' llama.cpp server (prefix reuse off)
from llama_server import start as start_llama_server  # noqa: E402
from common import request_for  # noqa: E402  (bench/, this script's folder)
from spec_nudging import spec_nudging  # noqa: E402

MODEL = "smollm2-135m-instruct"


class Server:
    """A llama.cpp server on a free port, logging the tokens it generates."""

    def __init__(self, gguf: Path, folder: Path, role: str) -> None:
        self.log = folder / f"{role}.generated"
        self.log.touch()
        try:
            self.process, self.url = start_llama_server(gguf, folder / f"{role}.log", ready_timeout=120,
                                                        env={"TOWLINE_GENERATED_LOG": str(self.log)})
        except RuntimeError as error:
            raise SystemExit(f"the {role} server did not start: {error}") from None

    def generated(self) -> int:
        """Tokens generated so far, once the server has logged every generation it began."""
        total = -1
        while True:  # a generation the client left is logged when the server notices
            time.sleep(0.3)
            now = sum(int(line) for line in self.log.read_text().split())
            if now == total:
                return total
            total = now

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure(servers: dict[str, Server], models: dict[str, OpenAIModel], answer) -> tuple[object, dict]:
    """Run ``answer()`` and what it cost, by role."""
    before = {role: (sum(models[role].requests.values()), dict(models[role].requests),
                     models[role].tokens_received, servers[role].generated()) for role in servers}
    started = time.perf_counter()
    result = answer()
    seconds = time.perf_counter() - started
    cost: dict = {"seconds": seconds}
    for role in servers:
        requests, paths, received, generated = before[role]
        cost[role] = {
            "requests": sum(models[role].requests.values()) - requests,
            "by_path": {path: n - paths.get(path, 0) for path, n in models[role].requests.items()
                        if n - paths.get(path, 0)},
            "received": models[role].tokens_received - received,
            "generated": servers[role].generated() - generated,
        }
    return result, cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    if not registry.is_installed(MODEL):
        registry.pull(MODEL)
    gguf = registry.gguf_file(MODEL)
    requests = [request_for(row["question"]) for row in datasets.load("gsm8k")[: args.questions]]
    options = dict(max_tokens=args.max_tokens)
    totals = {name: {"requests": 0, "generated": 0, "received": 0, "seconds": 0.0}
              for name in ("towline", "transcription", "adaptive")}
    answers = []
    adaptive_same_texts = []
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="towline-bench-")))
        servers = {role: Server(gguf, folder, role) for role in ("base", "guide")}
        for server in servers.values():
            stack.callback(server.close)
        # towline counts tokens with the model's own tokenizer, as load_model("openai:...")
        # sets it up for a registry model; the transcription asks the server.
        tokenizers = {"towline": str(registry.local_weights(MODEL)), "transcription": None}
        pairs = {name: {role: OpenAIModel(MODEL, base_urls=[servers[role].url], max_retries=0,
                                          tokenizer=tokenizers[name])
                        for role in ("base", "guide")} for name in ("towline", "transcription")}
        for pair in pairs.values():
            for model in pair.values():
                stack.callback(model.close)
        for request in requests:
            ours = pairs["towline"]
            answer = functools.partial(nudge, base=ours["base"], guide=ours["guide"], request=request,
                                       guide_template="chatml", **options)
            result, our_cost = measure(servers, ours, answer)
            theirs = pairs["transcription"]
            end_of_turn = build_prompt(request, chat=True, template="chatml").end_of_turn
            base = theirs["base"]
            # Each distinct text is counted once per answer, as any implementation would.
            count_tokens = functools.cache(OpenAIModel.count_tokens.__get__(base))
            base.count_tokens = count_tokens
            spec, their_cost = measure(servers, theirs, lambda: spec_nudging(
                base, theirs["guide"], result.prompts["base"], result.prompts["guide"],
                guide_stop=[end_of_turn], **options))
            del base.count_tokens
            same = ([(r.nudging_words, r.base_text) for r in result.rounds] == spec.rounds
                    and (result.text, result.stop_reason) == (spec.text, spec.stop_reason))
            if not same:
                raise SystemExit(f"the implementations differ on {request.question!r}:\n"
                                 f"towline: {result.rounds}\ntranscription: {spec.rounds}")
            adaptive, adaptive_cost = measure(servers, ours, functools.partial(answer, adapt_proposals=True))
            adaptive_same_texts.append(adaptive.text == result.text)
            answers.append({"rounds": len(result.rounds), "tokens": result.tokens, "stop_reason": result.stop_reason,
                            "towline": our_cost, "transcription": their_cost, "adaptive": adaptive_cost})
            for name, cost in (("towline", our_cost), ("transcription", their_cost), ("adaptive", adaptive_cost)):
                totals[name]["seconds"] += cost["seconds"]
                for key in ("requests", "generated", "received"):
                    totals[name][key] += cost["base"][key] + cost["guide"][key]
            print(json.dumps(answers[-1]), file=sys.stderr)
    per_answer = {name: {key: round(value / len(answers), 2) for key, value in total.items()}
                  for name, total in totals.items()}
    print(json.dumps({
        "model": MODEL, "questions": len(answers), "max_tokens": args.max_tokens, "identical_texts": True,
        "ratio": {key: round(totals["towline"][key] / totals["transcription"][key], 3)
                  for key in ("requests", "generated")},
        "ratio_adaptive": {key: round(totals["adaptive"][key] / totals["transcription"][key], 3)
                           for key in ("requests", "generated")},
        "adaptive_same_texts": adaptive_same_texts,
        "per_answer": per_answer, "answers": answers,
    }))


if __name__ == "__main__":
    main()
