"""The evaluation tasks: each data set with its prompt (as the nudging paper builds it), its
answer checker and how a judge scores it.

>>> task = TASKS["mmlu"]
>>> row = {"id": "1", "question": "2+2?\\nA. 4\\nB. 5", "answer": "A", "answer_text": "A. 4",
...        "subject": "elementary_mathematics"}
>>> request = task.request(row)
>>> request.system, request.question_prefix, request.context
('Answer the question by walking through the reasoning steps.', 'Question: ', 'Subject: elementary_mathematics\\n')
>>> task.gold(row)
'A. 4'
>>> TASKS["justeval"].request({"id": "1", "question": "Say hi.", "answer": ""}).question_prefix
'Instruction: '
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from towline.eval import checking
from towline.eval.datasets import Row
from towline.prompts import PromptRequest

REASONING_SYSTEM = "Answer the question by walking through the reasoning steps."
INSTRUCT_SYSTEM = "You are a helpful assistant."

Checker = Callable[[str, Row], checking.Check]


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    ``checker`` decides correctness offline (None where only a judge can score);
    ``judge`` names the judge's scoring: ``"correct"`` (the paper's correctness prompt, with
    the question, the answer and the gold answer), ``"aspects"`` (just-eval helpfulness,
    clarity, factuality, depth, engagement, 1-5) or ``"safety"`` (just-eval safety, 1-5);
    ``gold`` gives the gold answer as the paper shows it to the judge; ``context`` the text
    put before the question prefix."""

    name: str
    description: str
    """What the task asks, and the answer's form (shown by ``towline datasets``)."""
    system: str = REASONING_SYSTEM
    question_prefix: str = "Question: "
    answer_start: str = ""
    context: Callable[[Row], str] = lambda row: ""
    checker: Checker | None = None
    judge: str = "correct"
    gold: Callable[[Row], str] = field(default=lambda row: str(row.get("answer_text", row["answer"])))

    def request(self, row: Row, **overrides: str | None) -> PromptRequest:
        """The prompt parts for one row; ``overrides`` (``system=``, ``question_prefix=``,
        ``context=``, ``answer_start=``) replace the task's own where not None."""
        request = PromptRequest(question=row["question"], system=self.system, question_prefix=self.question_prefix,
                                context=self.context(row), answer_start=self.answer_start)
        return replace(request, **{k: v for k, v in overrides.items() if v is not None})


def _labels(labels: dict[str, tuple[str, ...]]) -> Checker:
    return lambda text, row: checking.check_label(text, row["answer"], labels)


TASKS: dict[str, Task] = {task.name: task for task in [
    Task("gsm8k", "grade-school math word problems; a number", checker=checking.check_math,
         gold=lambda row: row.get("solution", row["answer"])),
    Task("svamp", "arithmetic word problems, varied wording; a number", checker=checking.check_math,
         gold=lambda row: f"{row['equation']} = {row['answer']}" if "equation" in row else row["answer"]),
    Task("multiarith", "multi-step arithmetic word problems; a number", checker=checking.check_math,
         gold=lambda row: row["answer"]),
    Task("mmlu", "knowledge in 57 subjects; one of 4 options", context=lambda row: f"Subject: {row['subject']}\n"
         if row.get("subject") else "", checker=checking.check_choice),
    Task("arc_challenge", "grade-school science, hard set; one of 3-5 options", checker=checking.check_choice),
    Task("strategyqa", "questions needing implicit steps; true/false",
         checker=_labels(checking.TRUE_FALSE)),
    Task("csqa", "commonsense questions; one of 5 options", checker=checking.check_choice),
    Task("sports", "is a sports statement plausible; plausible/implausible", checker=_labels(checking.PLAUSIBLE),
         gold=lambda row: "1. yes\n2. plausible" if row["answer"] == "plausible" else "1. no\n2. implausible"),
    Task("date", "date arithmetic; a date MM/DD/YYYY", checker=checking.check_date),
    Task("coin_flip", "is the coin still heads up after flips; yes/no", checker=_labels(checking.YES_NO)),
    Task("last_letter_concat", "join the last letters of words; a letter string", checker=checking.check_letters),
    Task("justeval", "open instructions (just-eval-instruct); judged on 5 aspects", system=INSTRUCT_SYSTEM,
         question_prefix="Instruction: ", judge="aspects"),
    Task("justeval_safe", "harmful requests (just-eval-instruct); judged on safety", system=INSTRUCT_SYSTEM,
         question_prefix="Instruction: ", judge="safety"),
    Task("alpacaeval", "AlpacaEval instructions; judged on 5 aspects", system=INSTRUCT_SYSTEM,
         question_prefix="Instruction: ", judge="aspects"),
    Task("imdb", "continue a movie review; VADER sentiment of the text", system="",
         question_prefix="", checker=checking.check_positive, judge="none"),
]}
"""Every task by name. The eleven reasoning and knowledge tasks are checked offline and,
with a judge, by the paper's correctness prompt."""

REASONING_TASKS = ("gsm8k", "svamp", "multiarith", "mmlu", "arc_challenge", "strategyqa", "csqa", "sports",
                   "date", "coin_flip", "last_letter_concat")


def task(name: str) -> Task:
    """The task called ``name``; an error listing the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}: choose from {', '.join(TASKS)} "
                         "(`towline datasets` lists them)") from None
