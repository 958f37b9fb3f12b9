"""Answer checkers on real outputs of the bundled models (gemma-3-270m base, SmolLM2-135M-Instruct
guide, nudging), greedy, on items of the bundled data sets.

The tiny models are rarely right, so most outputs are checked twice: against the real gold
answer, and against the answer the model actually stated, which the checker must read.
"""

from __future__ import annotations

import pytest

from towline.eval import checking
from towline.eval.datasets import load
from towline.eval.tasks import TASKS


def row(task: str, item: str) -> dict:
    return next(r for r in load(task) if r["id"] == item)


def check(task: str, item: str, text: str, **gold):
    """The task's checker on the answer region of ``text``; ``gold`` replaces row fields."""
    the_task = TASKS[task]
    region = checking.answer_region(text, the_task.question_prefix, the_task.system)
    return the_task.checker(region, {**row(task, item), **gold})


# gemma-3-270m, base only: its answer, then a made-up next question.
BASE_GSM8K = "Answer: 18 pink plastic flamingos.\nQuestion:  Sue lives in a fun neighborhood.  One weekend"
BASE_GSM8K_2 = "Answer:  $1.50\nQuestion:  A customer buys a new car for $10,0"
BASE_SVAMP = ("Answer: 145\nQuestion: A store has 1000 bags of flour. If the store sells 1000 bags of flour, how "
              "many bags of flour are there?\nAnswer: 1000\nQuestion: A store has 1000 bags of flour.")
BASE_ARC = "Answer: D\nQuestion: Which of the following is NOT a characteristic of a glider?\nA. It can fly"
BASE_ARC_EMPTY = ("Answer:\nQuestion: Scientists found a new species of a complex organism at the bottom of the "
                  "ocean. The organism most")
# SmolLM2-135M-Instruct, guide only.
GUIDE_SVAMP = ("Baker made 145 cakes.\nHe sold 145 cakes.\nSo, Baker made 145 - 72 cakes.\nThe answer is 72.\n"
               "#### 72\nThe answer is Baker made 72 cakes.\n\nThe answer is Baker made 72 cakes.\n#### 72")
GUIDE_ARC = "A. is unicellular.\n\nThe correct answer is C. is made of multiple cells."
GUIDE_ARC_2 = ("A. environmental impact and mass\n\nThe primary factors to consider when designing a glider to "
               "cover a large distance are")
GUIDE_CSQA = "A. chest of drawers\n\nThe answer is A. chest of drawers."
GUIDE_MMLU = ("A. No, because it would be impossible to separate the post-accident injuries from those that existed "
              "prior to the accident.\n\nThe jury will not be able to separate the post-accident injuries from "
              "those that existed prior to the accident because of the post-accident injuries are always being "
              "apportioned to the driver who caused the accident.")
GUIDE_STRATEGYQA = ("The answer to this question is yes. Augustus was indeed named Augustus Caesar. He was the first "
                    "Roman Emperor to be born in the Roman Empire.")
GUIDE_DATE = ("To find the date a month ago in MM/DD/YYYY, we need to convert the date to a specific time format. "
              "First, we need to convert the date to a number of days. In this case, the date is 7/9/1972, so we "
              "can use the formula for days in a month: 7 days * 30 days/week = 18 days.\n\nNow, we can use the "
              "formula for")
GUIDE_COIN = ("To solve this problem, we need to analyze the possible outcomes of flipping a coin. If we flip a "
              "coin, it will either land on heads or tails. If we flip a coin, it will either land on either the "
              "coin flips flips or the coin flips tails.\n\nIn both cases, the coin will land on either heads or "
              "tails. So, we can conclude that the coin is either heads up or tails up.\n\nHowever, if we flip")
GUIDE_LETTERS = ("Rohan Antoinette Nikki Aida\n\nHere's the reasoning step-by-step:\n\n1. The original sentence was "
                 "\"Rohan Antoinette Nikki Aida.\"\n2. The original sentence was \"Rohan Antoinette Nikki A")
BASE_MMLU = ("E. No, the court cannot determine the amount of damages.\nAnswer the question by walking through the "
             "reasoning steps.\nSubject: professional_law\nQuestion: A man with a herniated lumbar disk was a "
             "passenger in a car that was hit by another car going through a stop sign.")
BASE_CSQA = ("Answer:\nA. chest of drawers\nB. grocery store\nC. hold alcohol\nD. nightstand\nE. bookcase\nAnswer:\n"
             "A. chest of drawers\nB. grocery store\nC. hold alcohol\nD. nightstand\nE. bookcase\nAnswer:")
# Nudging: the guide opens, the base carries on.
NUDGING_GSM8K = ("To solve this question, we need to break down the problem into manageable parts. We know that "
                 "Janet lays 16 eggs per day, so we can calculate the number of eggs she lays per day.\n\nShe eats "
                 "three for breakfast every morning and bakes muffins for her friends every day with four. So, we can "
                 "calculate the number of eggs she eats per day as 3 * 4 = 12 eggs.\n\n4 muffins are sold every day "
                 "for $2 per fresh duck egg. So, we can calculate the number of eggs she sells per day as 4 * 2 = 12 "
                 "eggs.\n\n16 eggs are sold per day, so we can calculate the number of eggs she sells per day as "
                 "16 * 12 = 192 eggs.")
NUDGING_ARC = "A. is a form of bacteria.\nB. is a form of bacteria.\nC."
NUDGING_ARC_LIST = ("A. is a form of bacteria.\nB. is a form of bacteria.\nC. is a form of eukaryotic cell.\n"
                    "D. lacks an organized nucleus.")
NUDGING_ARC_RECITAL = ("A. environmental impact and mass\nB. cost and environmental impact\nC. strength and cost\n"
                       "D. mass and strength\nA. environmental impact and mass\nB. cost and environmental impact\n"
                       "C. strength and")
GUIDE_ARC_LONG = ("A. environmental impact and mass\n\nThe primary factors to consider when designing a glider to "
                  "cover a large distance are environmental impact and mass. This is because gliders are designed "
                  "to be lightweight and can be designed to be more efficient in terms of fuel efficiency and weight "
                  "reduction. This is also a requirement for the design of aircraft, as it requires minimizing the "
                  "amount of fuel consumed and reducing the overall carbon footprint of the aircraft.\n\n"
                  "B. cost and cost-effectiveness\n")


def test_math_reads_the_final_number_before_a_made_up_question():
    assert check("gsm8k", "gsm8k-test-193", BASE_GSM8K) == checking.Check(False, "18")
    assert check("gsm8k", "gsm8k-test-193", BASE_GSM8K, answer="18").correct
    assert check("gsm8k", "gsm8k-test-661", BASE_GSM8K_2) == checking.Check(False, "1.50")
    assert check("gsm8k", "gsm8k-test-661", BASE_GSM8K_2, answer="1.5").correct  # compared by value
    assert check("svamp", "chal-277", BASE_SVAMP).extracted == "145"  # not the invented question's 1000
    assert check("gsm8k", "gsm8k-test-0", NUDGING_GSM8K) == checking.Check(False, "192")
    assert check("gsm8k", "gsm8k-test-0", NUDGING_GSM8K, answer="192").correct


def test_math_prefers_a_stated_answer_to_the_last_number():
    assert check("svamp", "chal-277", GUIDE_SVAMP) == checking.Check(False, "72")
    assert check("svamp", "chal-277", GUIDE_SVAMP, answer="72").correct


def test_choice_reads_a_letter_an_option_line_or_a_stated_answer():
    assert check("arc_challenge", "Mercury_7120908", BASE_ARC) == checking.Check(True, "D")
    assert check("arc_challenge", "Mercury_7141908", GUIDE_ARC) == checking.Check(True, "C")  # stated answer wins
    assert check("arc_challenge", "Mercury_7120908", GUIDE_ARC_2) == checking.Check(False, "A")
    assert check("csqa", "af3b9a8b1962cd3bcd19e644d873e7bc", GUIDE_CSQA) == checking.Check(False, "A")
    assert check("csqa", "af3b9a8b1962cd3bcd19e644d873e7bc", GUIDE_CSQA, answer="A").correct
    assert check("mmlu", "mmlu-val-professional_law-72", GUIDE_MMLU).extracted == "A"


def test_choice_without_an_answer_is_wrong():
    assert check("arc_challenge", "Mercury_7141908", BASE_ARC_EMPTY) == checking.Check(False, None)


def test_a_list_of_options_chooses_nothing():
    item = row("arc_challenge", "Mercury_7141908")
    recital = "\n".join(item["question"].splitlines()[1:]) + "\nSo it is made of multiple cells."
    assert checking.check_choice(recital, item) == checking.Check(True, "C")
    assert check("arc_challenge", "Mercury_7141908", NUDGING_ARC_LIST) == checking.Check(False, None)
    assert check("arc_challenge", "Mercury_7120908", NUDGING_ARC_RECITAL) == checking.Check(False, None)
    assert check("arc_challenge", "Mercury_7120908", GUIDE_ARC_LONG) == checking.Check(False, "A")  # argued for A
    assert check("arc_challenge", "Mercury_7141908", NUDGING_ARC).extracted == "C"  # a lone last line
    assert check("csqa", "af3b9a8b1962cd3bcd19e644d873e7bc", BASE_CSQA) == checking.Check(False, None)
    assert check("mmlu", "mmlu-val-professional_law-72", BASE_MMLU) == checking.Check(False, None)  # E is no option


def test_labels_yes_no_true_false():
    assert check("strategyqa", "3d55b2ce338f4e2cdcf4", GUIDE_STRATEGYQA) == checking.Check(False, "true")
    assert check("strategyqa", "3d55b2ce338f4e2cdcf4", GUIDE_STRATEGYQA, answer="true").correct
    assert check("coin_flip", "coin_flip-472", GUIDE_COIN) == checking.Check(False, None)  # never says yes or no


def test_labels_plausible():
    statement = "Determine whether ... plausible or implausible:\nStatement: Jacob deGrom took a corner kick"
    answer = "The statement is not plausible: deGrom is a baseball pitcher, and corner kicks are in soccer."
    assert checking.check_label(answer, "implausible", checking.PLAUSIBLE) == checking.Check(True, "implausible")
    assert not checking.check_label("It is plausible.", "implausible", checking.PLAUSIBLE).correct
    assert checking.check_label(statement, "plausible", checking.PLAUSIBLE).extracted == "implausible"


def test_dates_are_normalised_to_mm_dd_yyyy():
    assert check("date", "date-247", GUIDE_DATE) == checking.Check(False, "07/09/1972")
    assert check("date", "date-247", GUIDE_DATE, answer="07/09/1972").correct


def test_last_letters():
    assert not check("last_letter_concat", "last_letter_concat-424", GUIDE_LETTERS).correct
    assert check("last_letter_concat", "last_letter_concat-424", 'The answer is "neia".').correct
    assert check("last_letter_concat", "last_letter_concat-424", "n, e, i, a").correct


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_prompts_and_scores(name):
    the_task = TASKS[name]
    first = load(name)[0]
    request = the_task.request(first)
    assert request.question == first["question"] and request.question_prefix == the_task.question_prefix
    assert the_task.checker is not None or the_task.judge != "none"
    assert the_task.gold(first)
