"""Decoding methods, one file each, all written against :class:`towline.models.base.Model`.

Importing this package registers every method in :data:`METHODS`; a new method is one file
plus one import line here.
"""

from towline.methods import nudging, single  # noqa: F401  (each registers its methods)
from towline.methods import logit_arithmetic  # noqa: F401
from towline.methods import search  # noqa: F401
from towline.methods.base import METHODS, Method, OptionError, Participant, Result, Role, method_class

__all__ = ["METHODS", "Method", "OptionError", "Participant", "Result", "Role", "method_class"]
