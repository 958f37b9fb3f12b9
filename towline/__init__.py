"""towline: inference-time alignment by guided decoding.

Small aligned models steer a large base model while it decodes. Start with
:func:`towline.generate`; models live in :mod:`towline.models`, methods in
:mod:`towline.methods`.
"""

from towline.api import generate
from towline.models import load_model
from towline.models.base import Sampling
from towline.prompts import PromptRequest

__all__ = ["PromptRequest", "Sampling", "generate", "load_model"]
