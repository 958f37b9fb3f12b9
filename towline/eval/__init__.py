"""Evaluation: the papers' tasks, answer checking, LLM judges, resumable runs and reports.

``towline eval`` (:func:`towline.eval.runner.evaluate`) runs registered methods on the bundled
data sets (:mod:`towline.eval.datasets`, :mod:`towline.eval.tasks`), checks answers offline
(:mod:`towline.eval.checking`) and with an optional LLM judge (:mod:`towline.eval.judge`);
``towline report`` (:mod:`towline.eval.report`) compares runs.
"""
