"""Decoding methods, each written against :class:`towline.models.base.Model` only."""
