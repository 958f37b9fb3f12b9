"""Models: one small interface (:mod:`towline.models.base`), one file per backend.

>>> from towline.models import parse_openai_spec
>>> parse_openai_spec("openai:smollm2-135m-instruct@http://127.0.0.1:8080/v1,http://127.0.0.1:8081/v1")
('smollm2-135m-instruct', ['http://127.0.0.1:8080/v1', 'http://127.0.0.1:8081/v1'])
"""

from __future__ import annotations

from towline.models.base import GREEDY, Completion, Model, ModelError, Sampling, Scored, Step, Token

__all__ = ["GREEDY", "Completion", "Model", "ModelError", "Sampling", "Scored", "Step", "Token",
           "load_model", "parse_openai_spec"]

OPENAI_PREFIX = "openai:"


def parse_openai_spec(spec: str) -> tuple[str, list[str]]:
    """Split ``openai:MODEL@URL[,URL...]`` into the model name and its server URLs."""
    name, _, urls = spec.removeprefix(OPENAI_PREFIX).partition("@")
    base_urls = [u.strip() for u in urls.split(",") if u.strip()]
    if not name or not base_urls:
        raise ModelError(f"cannot read model {spec!r}: write openai:MODEL@URL, e.g. "
                         "openai:my-model@http://127.0.0.1:8000/v1 (several URLs: comma-separated)")
    return name, base_urls


def load_model(spec: str) -> Model:
    """Open a model from a spec string:

    - a registry name (``towline models`` lists them), a ``.gguf`` file, a local model
      directory or a Hugging Face id: local weights through transformers;
    - ``openai:MODEL@URL[,URL...]``: an OpenAI-compatible server (several URLs are used
      round-robin). A registry name as MODEL also supplies that model's chat template and
      vocabulary, and its tokenizer where its converted copy is cached (to count tokens
      without a request: see :class:`~towline.models.openai.OpenAIModel`).

    A spec that can be none of these (a misspelt name, say) fails at once with a
    :class:`ModelError` naming the closest registry names, also while the Hub is out of reach.
    """
    if spec.startswith(OPENAI_PREFIX):
        from towline.models.openai import OpenAIModel
        from towline.models.registry import REGISTRY, converted_dir
        from towline.prompts import FAMILIES

        name, base_urls = parse_openai_spec(spec)
        known = REGISTRY.get(name)
        template = FAMILIES[known.template] if known and known.template else None
        converted = converted_dir(name) if known else None
        tokenizer = str(converted) if converted and (converted / "tokenizer.json").is_file() else None
        return OpenAIModel(name, base_urls=base_urls, chat_template=template,
                           vocabulary=known.vocabulary if known else None, tokenizer=tokenizer)
    from towline.models.local import LocalModel

    return LocalModel.load(spec)
