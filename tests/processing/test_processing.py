"""The processor reproduces the released pipeline: transformers' PIL image backend, LAVIS's tokenizer rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessorPil
from transformers import InstructBlipProcessor as HFInstructBlipProcessor

from instructblip.errors import ConfigError, DataError
from instructblip.processing import ImageTransform, InstructBlipProcessor


def random_image(seed: int, size=(97, 64), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture()
def vicuna(vicuna_tokenizer, bert_tokenizer):
    return InstructBlipProcessor.from_parts(vicuna_tokenizer, bert_tokenizer)


@pytest.fixture()
def t5(t5_tokenizer, bert_tokenizer):
    return InstructBlipProcessor.from_parts(t5_tokenizer, bert_tokenizer)


# --------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "size,resample,mean,std,mode",
    [
        ((224, 224), 3, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "RGB"),
        ((32, 48), 2, (0.5, 0.5, 0.5), (0.25, 0.3, 0.2), "L"),  # a grey image and a non-square bilinear config
        ((64, 64), 3, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7), "RGBA"),
    ],
)
def test_pixel_values_match_transformers_pil_backend(size, resample, mean, std, mode):
    config = {
        "size": {"height": size[0], "width": size[1]},
        "resample": resample,
        "image_mean": list(mean),
        "image_std": list(std),
    }
    ours = ImageTransform.from_config(config)
    reference = BlipImageProcessorPil(**config)
    images = [random_image(1, mode=mode), random_image(2, size=(300, 211), mode=mode)]
    expected = reference(images, return_tensors="pt")["pixel_values"]
    got = torch.stack([ours(image) for image in images])
    assert got.shape == expected.shape == (2, 3, *size)
    assert (got - expected).abs().max().item() <= 1e-6


def test_train_transform_crops_and_flips_at_the_configured_size(vicuna):
    image = random_image(3, size=(120, 90))
    torch.manual_seed(0)
    views = vicuna.pixel_values([image] * 6, train=True)
    assert views.shape == (6, 3, 224, 224)
    # random crops differ from each other and from the deterministic eval view
    assert not torch.allclose(views[0], views[1])
    assert not torch.allclose(views[0], vicuna.pixel_values([image])[0])


def test_video_frames_stack_to_b_t_c_h_w(vicuna):
    clips = [[random_image(i + 10 * j) for i in range(4)] for j in range(2)]
    pixels = vicuna.pixel_values(clips)
    assert pixels.shape == (2, 4, 3, 224, 224)
    assert torch.equal(pixels[1, 2], vicuna.pixel_values([clips[1][2]])[0])
    with pytest.raises(DataError, match="same number of frames"):
        vicuna.pixel_values([clips[0], clips[1][:3]])


def test_resample_code_must_be_a_pil_filter():
    with pytest.raises(ConfigError, match="resample=7"):
        ImageTransform.from_config({"resample": 7})


# --------------------------------------------------------------------------------------------------- Q-Former text


def test_qformer_rows_are_cls_sep_left_truncated_at_128(vicuna, bert_tokenizer):
    long_instruction = " ".join(f"word{i}" for i in range(200)) + " what colour is the square?"
    batch = vicuna.qformer_batch(["short question?", long_instruction])
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    assert ids.shape == (2, 128)
    cls_id, sep_id = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    assert ids[0, 0] == cls_id and ids[1, 0] == cls_id and ids[1, -1] == sep_id
    # left truncation keeps the question at the end
    tail = bert_tokenizer("what colour is the square?", add_special_tokens=False)["input_ids"]
    assert ids[1, -1 - len(tail) : -1].tolist() == tail
    # padding to the longest, on the right
    n = int(mask[0].sum())
    assert ids[0, n - 1] == sep_id and (ids[0, n:] == bert_tokenizer.pad_token_id).all()
    assert len(bert_tokenizer) == 30523 and bert_tokenizer.convert_tokens_to_ids("[DEC]") == 30522


def test_default_qformer_tokenizer_is_bert_base_uncased_plus_dec(bert_tokenizer):
    from instructblip.processing import default_qformer_tokenizer

    tokenizer = default_qformer_tokenizer()
    assert len(tokenizer) == 30523 and tokenizer.bos_token == "[DEC]" and tokenizer.truncation_side == "left"
    text = "What is unusual about this image?"
    assert tokenizer(text)["input_ids"] == bert_tokenizer(text)["input_ids"]
    assert tokenizer(text)["input_ids"][:2] == [101, 2054]  # [CLS] what


# --------------------------------------------------------------------------------------------------- Vicuna rules


def test_vicuna_rows_start_with_eos_as_bos(vicuna, vicuna_tokenizer):
    batch = vicuna.generation_batch(None, ["what is in the image?"])
    assert batch["input_ids"][0, 0].item() == 2 == vicuna_tokenizer.convert_tokens_to_ids("</s>")


def test_tokenizer_prepending_a_different_bos_is_rejected(fresh_vicuna_tokenizer, bert_tokenizer):
    broken = fresh_vicuna_tokenizer
    broken.add_bos_token = True
    broken.bos_token = "<s>"  # post-processor still prepends "</s>" (2): the two disagree
    with pytest.raises(ConfigError, match="bos_token is '<s>'"):
        InstructBlipProcessor.from_parts(broken, bert_tokenizer)
    broken.bos_token = "</s>"
    broken.add_bos_token = False
    broken.update_post_processor()  # now prepends nothing: a Vicuna prompt must start with "</s>"
    with pytest.raises(ConfigError, match="prepends nothing"):
        InstructBlipProcessor.from_parts(broken, bert_tokenizer)


def test_vicuna_training_rows_labels_and_padding(vicuna, vicuna_tokenizer):
    instructions = ["what is in the image?", "how many shapes are there?"]
    targets = ["a red square next to a blue circle", "three"]
    batch = vicuna.training_batch(None, instructions, targets)
    pad, eos = vicuna_tokenizer.pad_token_id, vicuna_tokenizer.eos_token_id
    assert pad == vicuna_tokenizer.convert_tokens_to_ids("[PAD]")
    for row in range(2):
        # LAVIS: instruction tokenized with bos; answer + "</s>" tokenized with bos, bos dropped
        instruction = vicuna_tokenizer(instructions[row])["input_ids"]
        answer = vicuna_tokenizer(targets[row] + vicuna_tokenizer.eos_token)["input_ids"][1:]
        n = len(instruction) + len(answer)
        assert batch["input_ids"][row, :n].tolist() == instruction + answer
        assert (batch["input_ids"][row, n:] == pad).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        labels = batch["labels"][row].tolist()
        assert labels[: len(instruction)] == [-100] * len(instruction)
        assert labels[len(instruction) : n] == answer and answer[-1] == eos
        assert all(label == -100 for label in labels[n:])
    assert batch["labels"].shape == batch["input_ids"].shape


def test_vicuna_truncation_left_for_instruction_right_for_answer(vicuna, vicuna_tokenizer):
    instruction = "red " * 300 + "how many shapes are there?"
    answer = "blue " * 400
    batch = vicuna.training_batch(None, [instruction], [answer])
    labels = batch["labels"][0]
    n_instruction = int((labels == -100).sum())
    n_answer = batch["input_ids"].shape[1] - n_instruction
    assert n_instruction == 128 and n_answer == 255
    tail = vicuna_tokenizer("how many shapes are there?", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, 0] == 2
    assert batch["input_ids"][0, 128 - len(tail) : 128].tolist() == tail
    # LAVIS's 256 counts the bos it drops; the over-long answer loses its "</s>" exactly as there
    head = vicuna_tokenizer(answer, add_special_tokens=False)["input_ids"][:255]
    assert batch["input_ids"][0, 128:].tolist() == head


def test_vicuna_generation_rows_match_transformers_processor_left_padding(vicuna, tmp_path):
    prompts = ["what is in the image?", "how many?", "describe the picture briefly."]
    images = [random_image(i) for i in range(3)]
    ours = vicuna.generation_batch(images, prompts)
    vicuna.save_pretrained(tmp_path)
    reference = HFInstructBlipProcessor.from_pretrained(tmp_path)
    expected = reference(images=images, text=prompts, padding="longest", return_tensors="pt")
    image_id = vicuna.image_token_id
    q = vicuna.num_query_tokens
    assert (expected["input_ids"][:, :q] == image_id).all()
    # transformers: [<image>]*32 + [pads] + BOS + prompt; ours: the same without the image placeholders
    assert torch.equal(ours["input_ids"], expected["input_ids"][:, q:])
    assert torch.equal(ours["attention_mask"], expected["attention_mask"][:, q:])
    assert ours["attention_mask"][1, 0] == 0 and ours["attention_mask"][1, -1] == 1
    assert torch.equal(ours["qformer_input_ids"], expected["qformer_input_ids"])
    # (pixels: AutoImageProcessor picks the torchvision backend here, ~1 uint8 step off; the PIL backend is the
    # reference, compared above)


# --------------------------------------------------------------------------------------------------- T5 rules


def test_t5_rows_labels_and_truncation(t5, t5_tokenizer):
    instructions = ["what is in the image?", "zebra " * 300 + "how many?"]
    targets = ["a red square", "kite " * 400]
    batch = t5.training_batch(None, instructions, targets)
    eos, pad = t5_tokenizer.eos_token_id, t5_tokenizer.pad_token_id
    assert t5.llm_kind == "encoder_decoder"
    first = t5_tokenizer(instructions[0])["input_ids"]
    assert first[-1] == eos and batch["input_ids"][0, : len(first)].tolist() == first
    assert (batch["input_ids"][0, len(first) :] == pad).all()
    assert batch["input_ids"].shape[1] == 128 and batch["input_ids"][1, -1] == eos
    tail = t5_tokenizer("how many?", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][1, -1 - len(tail) : -1].tolist() == tail
    answer = t5_tokenizer(targets[0])["input_ids"]
    assert batch["labels"][0, : len(answer)].tolist() == answer
    assert (batch["labels"][0, len(answer) :] == -100).all()
    assert batch["decoder_attention_mask"][0].sum() == len(answer)
    # right truncation of the answer keeps "</s>" (T5's tokenizer does), 256 in all
    expected_long = t5_tokenizer(targets[1], truncation=True, max_length=256)["input_ids"]
    assert batch["labels"][1].tolist() == expected_long and expected_long[-1] == eos


def test_t5_generation_rows_are_right_padded(t5, t5_tokenizer):
    batch = t5.generation_batch(None, ["what is in the image?", "how many?"])
    short = t5_tokenizer("how many?")["input_ids"]
    assert batch["input_ids"][1, : len(short)].tolist() == short
    assert batch["attention_mask"][1, -1] == 0


# --------------------------------------------------------------------------------------------------- save, load


@pytest.mark.parametrize("kind", ["vicuna", "t5"])
def test_save_load_round_trip_and_image_token_export(kind, request, tmp_path):
    processor = request.getfixturevalue(kind)
    vocab_before = len(processor.tokenizer)
    image_id = processor.image_token_id
    assert image_id == vocab_before  # not in the tokenizer: the export appends it
    processor.save_pretrained(tmp_path)
    assert len(processor.tokenizer) == vocab_before  # export works on a copy
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "qformer_tokenizer" / "tokenizer_config.json").is_file()
    assert json.loads((tmp_path / "processor_config.json").read_text())["num_query_tokens"] == 32

    reloaded = InstructBlipProcessor.from_pretrained(tmp_path, llm_kind=processor.llm_kind)
    assert reloaded.tokenizer.convert_tokens_to_ids("<image>") == image_id == reloaded.image_token_id
    assert reloaded.image_transform.to_config() == processor.image_transform.to_config()
    prompts = ["what is in the image?", "how many shapes are there?"]
    targets = ["a red square", "three"]
    for a, b in zip(
        processor.training_batch(None, prompts, targets).values(),
        reloaded.training_batch(None, prompts, targets).values(),
    ):
        assert torch.equal(a, b)
    reference = HFInstructBlipProcessor.from_pretrained(tmp_path)
    assert reference.tokenizer.convert_tokens_to_ids("<image>") == image_id


def test_from_pretrained_reads_image_settings_and_llm_kind(vicuna, tmp_path):
    vicuna.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").unlink()  # 4.x hub layout: preprocessor_config.json only
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config.update(size={"height": 40, "width": 56}, image_mean=[0.1, 0.2, 0.3])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"model_type": "t5"}}))
    processor = InstructBlipProcessor.from_pretrained(tmp_path)
    assert processor.llm_kind == "encoder_decoder"
    assert processor.image_transform.size == (40, 56) and processor.image_transform.mean == (0.1, 0.2, 0.3)
    assert processor.pixel_values([random_image(0)]).shape == (1, 3, 40, 56)


def test_decode_skips_special_tokens_and_strips(vicuna, vicuna_tokenizer):
    ids = vicuna_tokenizer(["a red square", "three"], padding="longest")["input_ids"]
    ids = [row + [vicuna_tokenizer.eos_token_id, vicuna_tokenizer.pad_token_id] for row in ids]
    assert vicuna.decode(torch.tensor(ids)) == ["a red square", "three"]


# --------------------------------------------------------------------------------------------------- fixed lengths


@pytest.mark.parametrize("kind", ["vicuna", "t5"])
def test_fixed_lengths_give_one_shape_with_the_rows_of_longest_padding(kind, request):
    """One bucket: every training batch has the same shapes (a CUDA-graph step replays one), holding the rows of the
    usual batch, truncated to the fixed lengths, then padding."""
    processor = request.getfixturevalue(kind)
    bucket = {"instruction": 24, "target": 8, "qformer": 20}
    fixed = processor.with_fixed_lengths([bucket])
    widths = fixed.training_lengths(bucket)
    batches = [
        (["what is in the image?", "how many?"], ["a red square", "three"]),
        (["describe the picture briefly. " * 3], ["a red square next to a blue circle and a kite " * 2]),
    ]
    for instructions, targets in batches:
        batch = fixed.training_batch(None, instructions, targets)
        assert batch["qformer_input_ids"].shape[1] == widths["qformer"] == 20
        assert batch["input_ids"].shape[1] == batch["attention_mask"].shape[1] == widths["text"]
        assert batch["labels"].shape[1] == widths.get("labels", widths["text"])
        # the same rows as the longest-padded batch of a processor truncating at these lengths
        truncating = processor.with_fixed_lengths([bucket])
        truncating.length_buckets = None
        usual = truncating.training_batch(None, instructions, targets)
        for key, value in usual.items():
            width = value.shape[1]
            assert torch.equal(batch[key][:, :width], value), key
            pad = {"labels": -100, "input_ids": processor.pad_token_id}.get(key, 0)
            assert (batch[key][:, width:] == pad).all(), key
    assert usual["input_ids"].shape[1] < widths["text"] or kind == "t5"  # the long batch was truncated, not cut
    # the decoder-only text row: instruction (BOS included) up to 24, answer + EOS up to 8 - BOS
    assert widths["text"] == (24 + 8 - 1 if kind == "vicuna" else 24)
    assert processor.length_buckets is None and processor.max_instruction_length == 128  # a copy


@pytest.mark.parametrize("kind", ["vicuna", "t5"])
def test_length_buckets_pad_each_batch_to_the_first_that_holds_it(kind, request):
    """Each batch takes the first bucket whose widths hold its longest rows, measured on the batch the processor
    pads to the longest: a decoder-only row as one sequence (instruction and answer together), T5's instruction
    and answer each in its own width, the Q-Former text in its own; past the last bucket, the last (truncated)."""
    processor = request.getfixturevalue(kind)
    scale = 1 if kind == "vicuna" else 3  # the test T5 tokenizer cuts text into about three times as many pieces
    buckets = [{"instruction": 12, "target": 4 * scale, "qformer": 12},
               {"instruction": 24, "target": 16 * scale, "qformer": 24},
               {"instruction": 48, "target": 32 * scale, "qformer": 48}]
    fixed = processor.with_fixed_lengths(buckets)
    unpadded = processor.with_fixed_lengths(buckets)
    unpadded.length_buckets = None
    widths = [fixed.training_lengths(bucket) for bucket in buckets]
    cases = [
        (["how many?"], ["three"]),
        (["how many?"], ["a red square next to a blue circle and a green kite"]),
        (["describe the picture briefly, please, with every shape. " * 2], ["three"]),
        (["red " * 200], ["kite " * 200]),  # longer than the last bucket: truncated to it
    ]
    chosen = []
    for instructions, targets in cases:
        batch, usual = (p.training_batch(None, instructions, targets) for p in (fixed, unpadded))
        longest = {"text": int(usual["attention_mask"].sum(1).max()),
                   "qformer": int(usual["qformer_attention_mask"].sum(1).max())}
        if kind == "t5":
            longest["labels"] = int(usual["decoder_attention_mask"].sum(1).max())
        index = next((k for k, w in enumerate(widths) if all(w[key] >= n for key, n in longest.items())),
                     len(buckets) - 1)
        chosen.append(index)
        assert batch["input_ids"].shape[1] == widths[index]["text"], (instructions, targets)
        assert batch["qformer_input_ids"].shape[1] == widths[index]["qformer"]
        assert batch["labels"].shape[1] == widths[index].get("labels", widths[index]["text"])
        for key, value in usual.items():  # the same rows, then padding
            assert torch.equal(batch[key][:, : value.shape[1]], value), key
    assert len(set(chosen)) == 3 and chosen[-1] == 2, chosen  # the cases reach every bucket


def test_fixed_lengths_refuse_impossible_values(vicuna):
    with pytest.raises(ConfigError, match=r"data.fixed_lengths.qformer=0; must be >= 1"):
        vicuna.with_fixed_lengths([{"instruction": 16, "target": 8, "qformer": 0}])
    with pytest.raises(ConfigError, match=r"data.fixed_lengths.target=1; must exceed the 1 BOS"):
        vicuna.with_fixed_lengths([{"instruction": 16, "target": 1, "qformer": 16}])
    with pytest.raises(ConfigError, match=r"data.fixed_lengths\[1\]=.*smaller than the bucket before it"):
        vicuna.with_fixed_lengths([{"instruction": 16, "target": 8, "qformer": 16},
                                   {"instruction": 32, "target": 4, "qformer": 32}])
