"""``instructblip-generate``: the same answer as transformers' own generate, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


def run_cli(name: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / name), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def transformers_answer(checkpoint: Path, image_path: Path, prompt: str, **settings) -> str:
    """The oracle: transformers' processor (text) and PIL image backend, its model's generate, its decode."""
    from PIL import Image
    from transformers import BlipImageProcessorPil, InstructBlipForConditionalGeneration, InstructBlipProcessor

    model = InstructBlipForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = InstructBlipProcessor.from_pretrained(checkpoint)
    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    preprocessor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    pil_backend = BlipImageProcessorPil(**{k: v for k, v in preprocessor.items() if not k.endswith(("_type", "_class"))})
    inputs["pixel_values"] = pil_backend(image, return_tensors="pt")["pixel_values"]
    tokenizer = processor.tokenizer
    with torch.no_grad():
        output = model.generate(
            **inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **settings
        )
    if model.config.use_decoder_only_language_model:
        output = output[:, inputs["input_ids"].shape[1] :]  # transformers returns the prompt too
    return tokenizer.decode(output[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize(
    "llm,num_beams,subprocess_run",
    [
        ("llama", 1, True),  # greedy, through the installed console script
        ("llama", 3, False),  # beam search, main() in this process (no second interpreter start-up)
        ("t5", 3, False),
    ],
)
def test_cli_answer_equals_transformers_generate(
    tiny_dirs, image_file, llm, num_beams, subprocess_run, monkeypatch, capsys
):
    settings = dict(
        num_beams=num_beams,
        max_new_tokens=7,
        min_new_tokens=2,
        repetition_penalty=1.5,
        length_penalty=1.0,
        do_sample=False,
    )
    expected = transformers_answer(tiny_dirs[llm], image_file, "What is unusual about this image?", **settings)
    assert expected  # the tiny model produces real tokens: the comparison is not between two empty strings
    overrides = (
        f"checkpoint={tiny_dirs[llm]}",
        f"image={image_file}",
        "prompt=What is unusual about this image?",
        *(f"{key}={value}" for key, value in settings.items()),
    )
    if subprocess_run:
        result = run_cli("instructblip-generate", *overrides)
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = run_in_process(monkeypatch, capsys, *overrides)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == expected
    assert "Traceback" not in err


def run_in_process(monkeypatch, capsys, *overrides: str) -> tuple[int, str, str]:
    """The command's main() in this process (no interpreter start-up): exit status, stdout, stderr."""
    from instructblip.cli import generate

    monkeypatch.setattr(sys, "argv", ["instructblip-generate", *overrides])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    capsys.readouterr()  # only what the command itself prints
    try:
        generate.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("instructblip-generate: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _broken_copy(source: Path, destination: Path, edit) -> Path:
    import shutil

    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    edit(config)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_bad_inputs_give_one_line_errors(tiny_dirs, image_file, tmp_path, monkeypatch, capsys):
    good = tiny_dirs["llama"]
    missing = tmp_path / "missing-checkpoint"
    _assert_one_line_error(
        *run_in_process(monkeypatch, capsys, f"checkpoint={missing}", f"image={image_file}", "prompt=hi")[::2],
        str(missing),
        "does not exist",
    )
    wrong_image = tmp_path / "no-such.png"
    _assert_one_line_error(
        *run_in_process(monkeypatch, capsys, f"checkpoint={good}", f"image={wrong_image}", "prompt=hi")[::2],
        str(wrong_image),
    )
    unreadable = tmp_path / "corrupt.jpg"
    unreadable.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    _assert_one_line_error(
        *run_in_process(monkeypatch, capsys, f"checkpoint={good}", f"image={unreadable}", "prompt=hi")[::2],
        str(unreadable),
        "not a readable image",
    )
    unknown_arch = _broken_copy(good, tmp_path / "arch", lambda c: c["text_config"].update(model_type="gpt-nine"))
    _assert_one_line_error(
        *run_in_process(monkeypatch, capsys, f"checkpoint={unknown_arch}", f"image={image_file}", "prompt=hi")[::2],
        "gpt-nine",
    )
    vocab = _broken_copy(good, tmp_path / "vocab", lambda c: c["text_config"].update(vocab_size=1000))
    _assert_one_line_error(
        *run_in_process(monkeypatch, capsys, f"checkpoint={vocab}", f"image={image_file}", "prompt=hi")[::2],
        "vocab_size",
        "1000",
    )
    lavis_file = tmp_path / "instruct_blip_vicuna7b_trimmed.pth"
    torch.save({"model": {}}, lavis_file)
    _assert_one_line_error(
        *run_in_process(monkeypatch, capsys, f"checkpoint={lavis_file}", f"image={image_file}", "prompt=hi")[::2],
        "model=",
        "vision=",
        "llm=",
    )
    _assert_one_line_error(
        *run_in_process(monkeypatch, capsys, f"checkpoint={good}", f"image={image_file}", "beams=3")[::2],
        "unknown setting 'beams'",
        "num_beams",
    )


def test_bad_input_through_the_console_script_has_no_traceback(image_file, tmp_path, monkeypatch, capsys):
    corrupt = tmp_path / "truncated.png"
    corrupt.write_bytes(image_file.read_bytes()[:100])
    result = run_cli("instructblip-generate", f"checkpoint={tmp_path}", f"image={corrupt}", "prompt=hi")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"instructblip-generate: error: image={corrupt}: not a readable")
    assert "Traceback" not in result.stderr
    # HYDRA_FULL_ERROR=1 gives the exception (and so the traceback) back
    from instructblip.cli import generate
    from instructblip.errors import DataError

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["instructblip-generate", f"checkpoint={tmp_path}", f"image={corrupt}"])
    with pytest.raises(DataError, match="not a readable image"):
        generate.main()


def test_video_frames_and_generation_config_defaults(tiny_dirs, image_file, tmp_path, monkeypatch, capsys):
    """``image=[f0,f1]`` is one video (frames in order); unset settings come from generation_config.json."""
    import shutil

    from PIL import Image

    from instructblip.model.instructblip import InstructBlip

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["llama"], checkpoint)
    config = json.loads((checkpoint / "generation_config.json").read_text())
    config.update(num_beams=2, max_new_tokens=4, repetition_penalty=1.0)
    (checkpoint / "generation_config.json").write_text(json.dumps(config))
    second = tmp_path / "second.png"
    Image.open(image_file).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)

    code, out, err = run_in_process(
        monkeypatch, capsys, f"checkpoint={checkpoint}", f"image=[{image_file},{second}]", "prompt=what happens?"
    )
    assert code == 0, err
    model = InstructBlip.from_pretrained(checkpoint)
    frames = [Image.open(image_file).convert("RGB"), Image.open(second).convert("RGB")]
    expected = model.generate([frames], ["what happens?"], num_beams=2, max_new_tokens=4, repetition_penalty=1.0)
    assert out.strip().splitlines()[-1] == expected[0]
