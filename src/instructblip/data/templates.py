"""Instruction templates: how a shard :class:`~instructblip.data.record.Record` becomes (instruction, target).

A record holds facts (a question, its reference answers, the choices, ...), never an instruction. This module
turns it into text, in one of two ways:

* **training** -- :func:`render(record, rng) <render>` draws one of the 10-15 templates of the record's template
  family with ``rng`` (a seeded ``random.Random``; the mixture hands every sample its own seed, so draws are
  reproducible) and picks the target the same way (a random reference caption / human answer, as LAVIS's
  instruct datasets do, so that answer frequencies become target frequencies);
* **evaluation** -- :func:`render_evaluation(record) <render_evaluation>` uses the single, fixed zero-shot prompt of
  the dataset (the paper's Appendix E table, keyed by dataset name in :data:`EVALUATION_PROMPTS`) or, for datasets
  the table does not list, the first template of the record's family. The target is the first reference; all
  references stay on the record for the metric.

The template wording of captioning, short VQA and question generation is the paper's appendix (facts carried over);
the other families' lists are written here in the same spirit. Rules from the paper, applied here:

* some short-answer templates say "short"/"briefly"/"a few words", others do not, so the model does not learn to
  always answer briefly (and can still give long answers where asked);
* scene-text datasets (a record with ``ocr_tokens``) get the OCR tokens as extra information, stated before the
  template: ``"OCR tokens: a, b, c. " + template`` (the TextVQA zero-shot prompt has exactly this shape);
* multiple-choice options are rendered ``"(a) first (b) second ..."`` and the target is the correct choice's text
  (ranking then scores the choice texts); ScienceQA's ``context`` is stated first as ``"Context: ... "``;
* LLaVA-Instruct-150K is already in instruction form and gets no templates (family ``conversation``, below).

Conversations (LLaVA, all turns kept by the converter): each draw picks ONE gpt turn; the instruction is the earlier
turns as context followed by the human turn that the gpt turn answers, the target is that gpt turn. We chose this
over concatenating every turn into one sample because the processor puts labels on the target only: a concatenated
sample would either drop the supervision of the earlier answers or train the model to also write the human's next
question. One draw per sample (not one sample per turn) also keeps a record's weight in the mixture equal to one
record, so that the ``sqrt`` sampling weights mean the same thing for every dataset. The processor truncates
instructions on the left, so a long context loses its oldest turns, never the question being answered.
"""

from __future__ import annotations

import random
import re
import string
from typing import NamedTuple

from instructblip.data.record import Record
from instructblip.errors import DataError

# ------------------------------------------------------------------------------------------------ template lists
# Placeholders: {question} {answer} {options} {text} {history} {statement}. A template is filled with str.format,
# so braces inside the record's text are never interpreted.

CAPTION_SHORT = (  # the paper's 13 captioning templates
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)

CAPTION_LONG = (  # detailed descriptions (datasets whose answer_length is "long")
    "Describe this image in detail.",
    "Give a detailed description of the image.",
    "Write a detailed description of what the photo shows.",
    "Explain everything you can see in the picture.",
    "Describe the scene in the image thoroughly, including the objects and what they are doing.",
    "What is happening in this image? Describe it in detail.",
    "Provide an elaborate account of the contents of the photo.",
    "Write a paragraph that describes the picture.",
    "Look at the image carefully and describe it in full.",
    "Tell me about this image, covering as many details as you can.",
    "Write a description for the photo.",
)

VQA_SHORT = (  # the paper's 10 VQA templates
    "{question}",
    "Question: {question}",
    "{question} A short answer to the question is",
    "Q: {question} A:",
    "Question: {question} Short answer:",
    "Given the image, answer the following question with no more than three words. {question}",
    "Based on the image, respond to this question with a short answer: {question}. Answer:",
    "Use the provided image to answer the question: {question} Provide your answer as short as possible:",
    'What is the answer to the following question? "{question}"',
    'The question "{question}" can be answered using the image. A short answer is',
)

QUESTION_GENERATION = (  # the paper's 6, plus 4 in the same style
    "Given the image, generate a question whose answer is: {answer}. Question:",
    "Based on the image, provide a question with the answer: {answer}. Question:",
    'Given the visual representation, create a question for which the answer is "{answer}".',
    "From the image provided, craft a question that leads to the reply: {answer}. Question:",
    "Considering the picture, come up with a question where the answer is: {answer}.",
    "Taking the image into account, generate an question that has the answer: {answer}. Question:",
    'Look at the image and write a question that "{answer}" answers.',
    "Ask a question about the image whose answer is {answer}. Question:",
    "Write a question about the photo. The answer to your question must be: {answer}.",
    'The answer is "{answer}". Using the image, what is the question?',
)

MULTIPLE_CHOICE = (
    "Question: {question} Options: {options}. Short answer:",
    "Question: {question} Options: {options}. Answer:",
    "{question} Choose one of the following options: {options}.",
    "{question} Options: {options}.",
    "Answer the question by picking one of the options. Question: {question} Options: {options}. Answer:",
    "Based on the image, which option answers the question? {question} {options}",
    "Given the image, choose the correct answer to the question from the options. {question} Options: {options}",
    "Select the best answer. Question: {question} Choices: {options}. Your choice:",
    "{question} Pick the right answer from {options}. Reply with the option only:",
    "Look at the image and answer the multiple-choice question. {question} Options: {options}. Short answer:",
    "Q: {question} Options: {options} A:",
)

CLASSIFICATION = (  # binary questions about an image with text written on it (HatefulMemes-like)
    'This is an image with: "{text}" written on it. {question} Answer:',
    'The image has the text "{text}" written on it. {question}',
    'Text on the image: "{text}". {question} Answer yes or no:',
    'Considering both the picture and its caption "{text}", {question_lower} Answer:',
    'An image reads: "{text}". {question} Short answer:',
    'Here is a meme with the words "{text}". {question}',
    'Look at the image and the text on it, "{text}". {question} Answer with yes or no.',
    'Image text: "{text}". Question: {question} Answer:',
    'Given the picture and the words "{text}" written on it, answer briefly: {question}',
    'The words "{text}" appear on this image. Taking both into account, {question_lower}',
)

DIALOG = (
    "Dialog history: {history}\n Question: {question} Short answer:",
    "Dialog history: {history}\n Question: {question} Answer:",
    "Here is a conversation about the image so far: {history} Now answer the next question. {question}",
    "Conversation so far: {history} Question: {question} A short answer:",
    "Continue the dialog about the image. {history} Q: {question} A:",
    "Previous questions and answers: {history} Based on the image, answer: {question}",
    "Given the image and the dialog {history}, answer the question briefly: {question}",
    "Chat history: {history}\n Next question: {question} Reply:",
    "Taking the earlier turns into account ({history}), what is the answer to {question}?",
    "Dialog: {history} Question: {question} Answer in a few words:",
)

VIDEO_QA = (
    "Question: {question} Short answer:",
    "{question}",
    "Question: {question}",
    "Q: {question} A:",
    "Based on the video, respond to this question with a short answer: {question} Answer:",
    "Watch the video frames and answer the question: {question}",
    "Given the video, answer the following question with no more than three words. {question}",
    'The question "{question}" is about the video. A short answer is',
    "Using what happens in the video, answer: {question} Keep the answer short:",
    "Look at the frames of the clip. {question} Answer:",
)

VISUAL_REASONING_STATEMENT = (  # true/false statements about an image (VSR-like records put the statement in question)
    'Based on the image, is this statement true or false? "{statement}" Answer:',
    'Is the following statement about the image true or false? "{statement}"',
    'Look at the image. "{statement}" True or false?',
    'Does the image match the sentence "{statement}"? Answer:',
    'Decide whether the image supports this claim: "{statement}". Short answer:',
    'Statement: "{statement}" Is it correct for this picture? Answer:',
    'Given the image, is it true that "{statement}"?',
    'Check the statement "{statement}" against the image. Answer true or false:',
    'Here is a description: "{statement}". Is it accurate for the image?',
    'Verify using the image: "{statement}" Answer:',
)

#: Template family -> templates. Families with an ``_ocr`` / ``_context`` variant are derived by prefix (see
#: :func:`template_family`), so they share these lists.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption_short": CAPTION_SHORT,
    "caption_long": CAPTION_LONG,
    "vqa": VQA_SHORT,
    "qg": QUESTION_GENERATION,
    "mc": MULTIPLE_CHOICE,
    "classification": CLASSIFICATION,
    "dialog": DIALOG,
    "video_qa": VIDEO_QA,
    "statement": VISUAL_REASONING_STATEMENT,
}

#: The families that the LLaVA-style conversation path renders without templates.
CONVERSATION_FAMILY = "conversation"

# ------------------------------------------------------------------------------------------------ evaluation prompts
# The paper's zero-shot prompts (Appendix E; reference/instructblip_lavis.md §3.4), keyed by registry name. Any
# dataset not listed falls back to the first template of its family, so held-in evaluation and ShapesWorld get a
# fixed prompt too. These strings must not change between runs: results are only comparable with the same prompt.
_SHORT_QUESTION = "Question: {question} Short answer:"
EVALUATION_PROMPTS: dict[str, str] = {
    "nocaps": "A short image description:",
    "flickr30k": "A short image description:",
    "gqa": _SHORT_QUESTION,
    "vizwiz": _SHORT_QUESTION,
    "ivqa": _SHORT_QUESTION,
    "msvd_qa": _SHORT_QUESTION,
    "msrvtt_qa": _SHORT_QUESTION,
    "scienceqa": "Context: {context} Question: {question} Options: {options}. Answer:",
    "iconqa": "Question: {question} Options: {options}. Short answer:",
    "textvqa": "OCR tokens: {ocr}. Question: {question} Short answer:",
    "visdial": "Dialog history: {history}\n Question: {question} Short answer:",
    "hateful_memes": 'This is an image with: "{text}" written on it. Is it hateful? Answer:',
    "vsr": 'Based on the image, is this statement true or false? "{statement}" Answer:',
}

#: The yes/no question a classification record is about, per dataset (records may also carry it in ``question``).
CLASSIFICATION_QUESTIONS: dict[str, str] = {"hateful_memes": "Is it hateful?"}
#: ... and for classification datasets that name no question at all.
GENERIC_CLASSIFICATION_QUESTION = "Does the text match the image?"


class Rendered(NamedTuple):
    instruction: str
    target: str


# ------------------------------------------------------------------------------------------------ field rendering


def render_options(choices: list[str]) -> str:
    """``["cat", "dog"]`` -> ``"(a) cat (b) dog"`` (letters a..z, then aa, ab, ... never needed in practice)."""
    return " ".join(f"({_option_letter(i)}) {choice}" for i, choice in enumerate(choices))


def _option_letter(index: int) -> str:
    letters = string.ascii_lowercase
    return letters[index] if index < 26 else letters[index // 26 - 1] + letters[index % 26]


def render_dialog_history(record: Record) -> str:
    """The caption, then each earlier round as ``question? answer.`` (VisDial questions have no '?')."""
    parts = [_sentence(record.caption)] if record.caption else []
    for turn in record.dialog_history or []:
        question = (turn.get("question") or "").strip()
        if question and not question.endswith("?"):
            question += "?"
        parts.append(f"{question} {_sentence(turn.get('answer') or '')}".strip())
    return " ".join(parts)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


_IMAGE_MARK = re.compile(r"\s*<image>\s*", re.IGNORECASE)


def _strip_image_mark(text: str) -> str:
    """LLaVA's first human turn carries an ``<image>`` placeholder; the model prepends the image itself."""
    return _IMAGE_MARK.sub(" ", text).strip()


# ------------------------------------------------------------------------------------------------ families


def _answer_length(record: Record) -> str:
    from instructblip.data.registry import DATASETS

    info = DATASETS.get(record.dataset)
    return info.answer_length if info is not None else "short"


def template_family(record: Record) -> str:
    """The template list a record draws from: its task family, refined by answer length (captions)."""
    task = record.task
    if task == "caption":
        return "caption_long" if _answer_length(record) == "long" else "caption_short"
    if task in ("vqa", "qg", "mc", "dialog", "video_qa"):
        return task
    if task == "classification":
        return "statement" if record.dataset == "vsr" else "classification"
    if task == "conversation":
        return CONVERSATION_FAMILY
    raise DataError(
        f"record {record.dataset}/{record.id}: unknown task {task!r}; templates exist for "
        f"caption, vqa, qg, mc, classification, dialog, conversation, video_qa"
    )


#: What a record of each task must carry for its instruction (and, in training, its target) to exist.
_INSTRUCTION_FIELDS: dict[str, tuple[str, ...]] = {
    "caption": (),
    "vqa": ("question",),
    "qg": ("answers",),
    "mc": ("question", "choices"),
    "classification": (),
    "dialog": ("question",),
    "conversation": ("conversation",),
    "video_qa": ("question",),
}


def missing_fields(record: Record, need_target: bool) -> list[str]:
    """The fields this record lacks for rendering (empty list: renderable). ``need_target``: training needs a
    target (a reference answer, the question for QG, a gpt turn), evaluation on unlabeled splits does not."""
    if record.task not in _INSTRUCTION_FIELDS:
        return [f"task (unknown: {record.task!r})"]
    missing = [name for name in _INSTRUCTION_FIELDS[record.task] if not getattr(record, name)]
    if record.task == "classification" and not (record.text or record.question):
        missing.append("text")
    if record.task == "conversation" and record.conversation:
        if not any(turn.get("from") == "gpt" for turn in record.conversation):
            missing.append("conversation (no gpt turn)")
    if need_target:
        if record.task == "qg":
            if not record.question:
                missing.append("question")
        elif record.task == "classification":
            if not record.answers and record.label is None:
                missing.append("answers")
        elif record.task == "mc":
            if not record.answers and record.answer_index is None:
                missing.append("answers")
        elif record.task == "dialog":
            if not record.answers and (record.answer_index is None or not record.candidates):
                missing.append("answers")
        elif record.task != "conversation" and not record.answers:
            missing.append("answers")
    return missing


# ------------------------------------------------------------------------------------------------ rendering


def _fields(record: Record, rng: random.Random | None) -> dict[str, str]:
    """Placeholder values; ``rng`` picks among several references (None: the first one)."""
    pick = (lambda items: rng.choice(items)) if rng is not None else (lambda items: items[0])
    question = (record.question or "").strip()
    classification_question = record.question or CLASSIFICATION_QUESTIONS.get(
        record.dataset, GENERIC_CLASSIFICATION_QUESTION
    )
    return {
        "question": question,
        "answer": pick(record.answers) if record.answers else "",
        "options": render_options(record.choices or []),
        "context": (record.context or "").strip(),
        "ocr": ", ".join(record.ocr_tokens or []),
        "text": (record.text or "").strip(),
        "statement": (record.question or record.text or record.caption or "").strip(),
        "history": render_dialog_history(record),
        "question_lower": classification_question[:1].lower() + classification_question[1:],
        **({"question": classification_question} if record.task == "classification" else {}),
    }


def _target(record: Record, rng: random.Random | None) -> str:
    """The training target (rng given) or the first reference (evaluation)."""
    pick = (lambda items: rng.choice(items)) if rng is not None else (lambda items: items[0])
    if record.task == "qg":
        return (record.question or "").strip()
    if record.task in ("mc", "dialog"):
        options = record.choices if record.task == "mc" else record.candidates
        if record.answer_index is not None and options and 0 <= record.answer_index < len(options):
            return options[record.answer_index]
    if record.task == "classification" and not record.answers and record.label is not None:
        return "yes" if record.label else "no"
    return pick(record.answers) if record.answers else ""


def _prefix_extras(record: Record, instruction: str, template: str) -> str:
    """OCR tokens and context go first, unless the template already places them itself."""
    if record.ocr_tokens and "{ocr}" not in template:
        instruction = f"OCR tokens: {', '.join(record.ocr_tokens)}. {instruction}"
    if record.context and record.context.strip() and "{context}" not in template and record.task == "mc":
        instruction = f"Context: {record.context.strip()} {instruction}"
    return instruction


def _render_conversation(record: Record, rng: random.Random | None) -> Rendered:
    turns = record.conversation or []
    answer_positions = [i for i, turn in enumerate(turns) if turn.get("from") == "gpt" and i > 0]
    if not answer_positions:
        raise DataError(f"record {record.dataset}/{record.id}: conversation has no gpt turn after a human turn")
    # training: any turn; evaluation/fixed: the first exchange (what LAVIS's LLaVA dataset uses)
    position = rng.choice(answer_positions) if rng is not None else answer_positions[0]
    speaker = {"human": "Human", "gpt": "Assistant"}
    context = " ".join(
        f"{speaker.get(turn.get('from'), turn.get('from'))}: {_strip_image_mark(turn.get('value', ''))}"
        for turn in turns[: position - 1]
    )
    question = _strip_image_mark(turns[position - 1].get("value", ""))
    instruction = f"{context} Human: {question} Assistant:" if context else question
    return Rendered(instruction, turns[position].get("value", "").strip())


def render(record: Record, choice: int | random.Random) -> Rendered:
    """(instruction, target) for a record.

    ``choice`` is a seeded ``random.Random`` in training (draws the template AND which reference is the target), or a
    template index (deterministic: first reference; raises if out of range). Conversations ignore templates.
    """
    family = template_family(record)
    rng = choice if isinstance(choice, random.Random) else None
    if family == CONVERSATION_FAMILY:
        return _render_conversation(record, rng)
    templates = TEMPLATES[family]
    if rng is not None:
        template = rng.choice(templates)
    else:
        if not isinstance(choice, int) or not 0 <= choice < len(templates):
            raise DataError(f"template index {choice!r} out of range for family {family!r} (0..{len(templates) - 1})")
        template = templates[choice]
    # QG: the instruction states an answer (drawn among the references), the target is the question
    instruction = _prefix_extras(record, template.format(**_fields(record, rng)), template)
    return Rendered(instruction, _target(record, rng))


def evaluation_template(record: Record) -> str:
    """The fixed evaluation prompt template of the record's dataset (see :data:`EVALUATION_PROMPTS`)."""
    if record.dataset in EVALUATION_PROMPTS:
        return EVALUATION_PROMPTS[record.dataset]
    family = template_family(record)
    if family == CONVERSATION_FAMILY:
        return "{conversation}"
    return TEMPLATES[family][0]


def render_evaluation(record: Record) -> Rendered:
    """(prompt, first reference) with the dataset's fixed zero-shot prompt: the same string in every call and
    process (no randomness, no dependence on the registry's state beyond the answer-length refinement)."""
    template = evaluation_template(record)
    if template == "{conversation}":
        return _render_conversation(record, None)
    values = _fields(record, None)
    if record.dataset == "scienceqa" and not values["context"]:
        # ScienceQA questions without a hint: drop the empty "Context:" instead of showing it blank
        template = template.replace("Context: {context} ", "")
    instruction = _prefix_extras(record, template.format(**values), template)
    return Rendered(instruction, _target(record, None))
