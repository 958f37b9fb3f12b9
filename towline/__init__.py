"""towline: inference-time alignment by guided decoding.

Small aligned models steer a large base model while it decodes. Start with
:func:`towline.generate` (one answer) or :func:`towline.compose` (a method bound to loaded
models, for many answers); models live in :mod:`towline.models`, methods in
:mod:`towline.methods`.
"""

from towline.api import Aligned, compose, generate
from towline.methods import METHODS
from towline.models import load_model
from towline.models.base import Sampling
from towline.prompts import PromptRequest

__all__ = ["METHODS", "Aligned", "PromptRequest", "Sampling", "compose", "generate", "load_model"]
