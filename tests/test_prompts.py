"""Tests for towline.prompts (docs/prompts.md)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from towline import prompts
from towline.prompts import ALIASES, FAMILIES, BuiltPrompt, PromptRequest, build_prompt

FULL = PromptRequest(
    question="What is 2+2?",
    system="Answer briefly.",
    question_prefix="Question: ",
    context="Subject: math\n",
    answer_start="Answer:",
)
NO_SYSTEM = dataclasses.replace(FULL, system="")

# Official templates as published in the models' tokenizer_config.json (they write BOS).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
GEMMA_IT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
LLAMA_2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA_3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
OLMO_7B_INSTRUCT = (  # has no system role: it silently drops a system message
    "{{ eos_token }}{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

EXPECTED = {  # family -> (text with system, text without system, end_of_turn)
    "llama-2-chat": (
        "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nSubject: math\nQuestion: What is 2+2? [/INST]Answer:",
        "[INST] Subject: math\nQuestion: What is 2+2? [/INST]Answer:",
        "</s>",
    ),
    "llama-3": (
        "<|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSubject: math\nQuestion: What is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAnswer:",
        "<|start_header_id|>user<|end_header_id|>\n\nSubject: math\nQuestion: What is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAnswer:",
        "<|eot_id|>",
    ),
    "gemma-it": (
        "<start_of_turn>user\nAnswer briefly.\nSubject: math\nQuestion: What is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\nAnswer:",
        "<start_of_turn>user\nSubject: math\nQuestion: What is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\nAnswer:",
        "<end_of_turn>",
    ),
    "olmo": (
        "<|endoftext|><|system|>\nAnswer briefly.\n<|user|>\nSubject: math\nQuestion: What is 2+2?\n"
        "<|assistant|>\nAnswer:",
        "<|endoftext|><|user|>\nSubject: math\nQuestion: What is 2+2?\n<|assistant|>\nAnswer:",
        "<|endoftext|>",
    ),
    "chatml": (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nSubject: math\n"
        "Question: What is 2+2?<|im_end|>\n<|im_start|>assistant\nAnswer:",
        "<|im_start|>user\nSubject: math\nQuestion: What is 2+2?<|im_end|>\n<|im_start|>assistant\nAnswer:",
        "<|im_end|>",
    ),
}


# --- plain ---------------------------------------------------------------------------------


def test_plain_with_system():
    built = build_prompt(FULL, chat=False)
    assert built == BuiltPrompt(
        "Answer briefly.\nSubject: math\nQuestion: What is 2+2?\nAnswer:", "plain", None
    )


def test_plain_without_system_has_no_leading_newline():
    assert build_prompt(NO_SYSTEM, chat=False).text == "Subject: math\nQuestion: What is 2+2?\nAnswer:"


def test_plain_ignores_model_template():
    assert build_prompt(FULL, chat=False, model_template=SMOLLM2).template == "plain"


# --- families ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_family_exact_text(family):
    with_system, without_system, end = EXPECTED[family]
    assert build_prompt(FULL, chat=True, template=family) == BuiltPrompt(with_system, f"family:{family}", end)
    assert build_prompt(NO_SYSTEM, chat=True, template=family).text == without_system


@pytest.mark.parametrize(
    ("family", "official", "bos", "eos", "requests"),
    [
        ("chatml", SMOLLM2, "<|im_start|>", "<|im_end|>", [FULL]),  # SmolLM2 adds a default system
        ("gemma-it", GEMMA_IT, "<bos>", "<eos>", [FULL, NO_SYSTEM]),
        ("llama-2-chat", LLAMA_2_CHAT, "<s>", "</s>", [FULL, NO_SYSTEM]),
        ("llama-3", LLAMA_3, "<|begin_of_text|>", "<|end_of_text|>", [FULL, NO_SYSTEM]),
        ("olmo", OLMO_7B_INSTRUCT, "", "<|endoftext|>", [NO_SYSTEM]),
    ],
)
def test_family_matches_official_template_minus_bos(family, official, bos, eos, requests):
    for request in requests:
        ours = build_prompt(request, chat=True, template=family)
        theirs = build_prompt(request, chat=True, model_template=official, bos_token=bos, eos_token=eos)
        assert theirs.text == (bos if family != "chatml" else "") + ours.text
        assert theirs.end_of_turn == ours.end_of_turn


def test_families_write_no_bos():
    for jinja in FAMILIES.values():
        assert "<s>[INST]" not in jinja and "<|begin_of_text|>" not in jinja and "<bos>" not in jinja
        assert "bos_token" not in jinja


def test_aliases_are_chatml():
    assert set(ALIASES) == {"smollm", "qwen"}
    for alias in ALIASES:
        assert FAMILIES[alias] == FAMILIES["chatml"]
        built = build_prompt(FULL, chat=True, template=alias)
        assert built == BuiltPrompt(EXPECTED["chatml"][0], "family:chatml", "<|im_end|>")


def test_family_names_are_case_insensitive():
    assert build_prompt(FULL, chat=True, template="ChatML").text == EXPECTED["chatml"][0]


# --- a model's own template ----------------------------------------------------------------


def test_own_template_smollm2_with_system():
    built = build_prompt(FULL, chat=True, model_template=SMOLLM2)
    assert built == BuiltPrompt(EXPECTED["chatml"][0], "model's own chat template", "<|im_end|>")


def test_own_template_smollm2_inserts_its_default_system():
    assert build_prompt(NO_SYSTEM, chat=True, model_template=SMOLLM2).text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nSubject: math\nQuestion: What is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nAnswer:"
    )


def test_own_template_that_raises_on_system_merges_it_into_user_turn():
    built = build_prompt(FULL, chat=True, model_template=GEMMA_IT, bos_token="<bos>")
    assert built == BuiltPrompt(
        "<bos><start_of_turn>user\nAnswer briefly.\nSubject: math\nQuestion: What is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\nAnswer:",
        "model's own chat template",
        "<end_of_turn>",
    )


def test_own_template_that_drops_system_merges_it_into_user_turn():
    built = build_prompt(FULL, chat=True, model_template=OLMO_7B_INSTRUCT, eos_token="<|endoftext|>")
    assert built.text == (
        "<|endoftext|><|user|>\nAnswer briefly.\nSubject: math\nQuestion: What is 2+2?\n<|assistant|>\nAnswer:"
    )
    assert built.end_of_turn == "<|endoftext|>"
    # the system text also occurring elsewhere in the prompt does not hide the drop
    sneaky = dataclasses.replace(NO_SYSTEM, system="user")
    built = build_prompt(sneaky, chat=True, model_template=OLMO_7B_INSTRUCT, eos_token="<|endoftext|>")
    assert built.text.startswith("<|endoftext|><|user|>\nuser\nSubject: math\n")


def test_own_template_end_of_turn_unknown_is_none():
    plain_turns = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    built = build_prompt(NO_SYSTEM, chat=True, model_template=plain_turns)
    assert built.text == "user: Subject: math\nQuestion: What is 2+2?\nassistant: Answer:"
    assert built.end_of_turn is None
    raising = "{{ raise_exception('no assistant') if messages|length > 1 }}{{ messages[0]['content'] }}"
    assert build_prompt(NO_SYSTEM, chat=True, model_template=raising).end_of_turn is None


def test_own_template_errors_propagate():
    with pytest.raises(Exception, match="broken"):
        build_prompt(NO_SYSTEM, chat=True, model_template="{{ raise_exception('broken') }}")


# --- overrides ------------------------------------------------------------------------------


def test_family_override_beats_model_template():
    built = build_prompt(FULL, chat=True, template="llama-3", model_template=SMOLLM2)
    assert built.text == EXPECTED["llama-3"][0] and built.template == "family:llama-3"


def test_plain_override_for_a_chat_model():
    built = build_prompt(FULL, chat=True, template="plain", model_template=SMOLLM2)
    assert built == build_prompt(FULL, chat=False)


def test_jinja_override_beats_model_template():
    custom = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    built = build_prompt(NO_SYSTEM, chat=True, template=custom, model_template=SMOLLM2)
    assert built == BuiltPrompt(
        "<user>Subject: math\nQuestion: What is 2+2?</user><assistant>Answer:", "custom", "</assistant>"
    )


def test_override_applies_to_a_base_model_too():
    assert build_prompt(FULL, chat=False, template="chatml").text == EXPECTED["chatml"][0]


# --- errors ---------------------------------------------------------------------------------


def test_unknown_family_lists_valid_names():
    with pytest.raises(ValueError, match="unknown template 'vicuna'") as info:
        build_prompt(FULL, chat=True, template="vicuna")
    for name in ["plain", "chatml", "gemma-it", "llama-2-chat", "llama-3", "olmo", "qwen", "smollm"]:
        assert name in str(info.value)


def test_chat_without_any_template_is_an_error():
    with pytest.raises(ValueError, match="family name .*chatml.*Jinja"):
        build_prompt(FULL, chat=True)


# --- renderer agrees with transformers ------------------------------------------------------


@pytest.mark.parametrize("template", [SMOLLM2, GEMMA_IT, LLAMA_2_CHAT, LLAMA_3, OLMO_7B_INSTRUCT])
def test_renderer_matches_transformers(template):
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    messages = [{"role": "user", "content": " Hi\n"}, {"role": "assistant", "content": "Hello"}]
    tokens = {"bos_token": "<B>", "eos_token": "<E>"}
    for convo, gen in [(messages[:1], True), (messages, False)]:
        expected = chat_utils.render_jinja_template(
            conversations=[convo], chat_template=template, add_generation_prompt=gen, **tokens
        )[0][0]
        assert prompts._render(template, convo, add_generation_prompt=gen, **tokens) == expected


# --- properties -----------------------------------------------------------------------------

texts = st.text(max_size=40)
requests = st.builds(
    PromptRequest, question=texts, system=texts, question_prefix=texts, context=texts, answer_start=texts
)


@settings(max_examples=200, deadline=None)
@given(requests)
def test_prompt_properties(request):
    plain = build_prompt(request, chat=False).text
    assert plain.endswith(request.question + "\n" + request.answer_start)
    chats = [build_prompt(request, chat=True, template=name) for name in FAMILIES]
    for official in (SMOLLM2, GEMMA_IT, LLAMA_2_CHAT, LLAMA_3, OLMO_7B_INSTRUCT):
        chats.append(build_prompt(request, chat=True, model_template=official, eos_token="</s>"))
    for built in chats:
        assert built.text.endswith(request.answer_start)
        assert request.question.strip() in built.text  # some templates trim the user turn
        assert request.system.strip() in built.text  # kept, whether as a turn or merged


# --- conversations (earlier turns) ----------------------------------------------------------

TALK = dataclasses.replace(FULL, history=(prompts.Turn("user", "What is 1+1?"), prompts.Turn("assistant", "2")))


def test_plain_history_is_a_verbatim_transcript_before_the_question():
    assert build_prompt(TALK, chat=False).text == (
        "Answer briefly.\nWhat is 1+1?\n2\nSubject: math\nQuestion: What is 2+2?\nAnswer:"
    )
    no_system = dataclasses.replace(TALK, system="")
    assert build_prompt(no_system, chat=False).text.startswith("What is 1+1?\n2\nSubject: math\n")


def test_chatml_history_turns_come_between_system_and_question():
    assert build_prompt(TALK, chat=True, template="chatml").text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\nSubject: math\nQuestion: What is 2+2?"
        "<|im_end|>\n<|im_start|>assistant\nAnswer:"
    )


def test_system_is_merged_into_the_first_user_turn_of_a_conversation():
    built = build_prompt(TALK, chat=True, model_template=GEMMA_IT, bos_token="<bos>")
    assert built.text == (
        "<bos><start_of_turn>user\nAnswer briefly.\nWhat is 1+1?<end_of_turn>\n<start_of_turn>model\n2"
        "<end_of_turn>\n<start_of_turn>user\nSubject: math\nQuestion: What is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\nAnswer:"
    )


@pytest.mark.parametrize("family", ["gemma-it", "llama-2-chat", "llama-3"])
def test_family_matches_official_template_with_history(family):
    official, bos, eos = {"gemma-it": (GEMMA_IT, "<bos>", "<eos>"), "llama-2-chat": (LLAMA_2_CHAT, "<s>", "</s>"),
                          "llama-3": (LLAMA_3, "<|begin_of_text|>", "<|end_of_text|>")}[family]
    ours = build_prompt(TALK, chat=True, template=family).text
    theirs = build_prompt(TALK, chat=True, model_template=official, bos_token=bos, eos_token=eos).text
    assert theirs == bos + ours  # the families leave the first BOS to the tokenizer


def test_history_accepts_dicts_and_tuples_and_stays_hashable():
    request = PromptRequest(question="q", history=[{"role": "user", "content": "a"}, ("assistant", "b")])
    assert request.history == (prompts.Turn("user", "a"), prompts.Turn("assistant", "b"))
    assert hash(request) == hash(dataclasses.replace(request))


def test_history_turn_roles_are_checked():
    with pytest.raises(ValueError, match="role must be 'user' or 'assistant', got 'system'"):
        PromptRequest(question="q", history=[{"role": "system", "content": "x"}])


turns = st.lists(st.builds(prompts.Turn, role=st.sampled_from(prompts.ROLES), content=texts), max_size=4)


@settings(max_examples=100, deadline=None)
@given(requests, turns)
def test_conversation_properties(request, history):
    talk = dataclasses.replace(request, history=history)
    for built in [build_prompt(talk, chat=False)] + [build_prompt(talk, chat=True, template=f) for f in ("chatml", "llama-3")]:
        assert built.text.endswith(request.answer_start)
        for turn in history:
            assert turn.content.strip() in built.text
    assert build_prompt(dataclasses.replace(request, history=()), chat=False) == build_prompt(request, chat=False)
