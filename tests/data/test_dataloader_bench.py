"""The data-loader benchmark's agreement check (experiments/bench/dataloader_throughput.py): ours and transformers'
InstructBlipProcessor, built from one tiny checkpoint, must turn the same decoded samples into the same batch (the
benchmark refuses to time them otherwise), and the check must catch a side that diverges."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "dataloader_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dataloader_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("dataloader-bench")


@pytest.fixture(scope="module")
def checkpoints(workdir):
    """One tiny Hugging Face InstructBLIP directory per LLM kind (224 px, 32 queries, as the benchmark builds)."""
    from instructblip.testing import make_tiny_checkpoint

    return {llm: make_tiny_checkpoint(workdir / f"tiny-{llm}", llm=llm, image_size=224, num_query_tokens=32)
            for llm in ("llama", "t5")}


@pytest.fixture(scope="module")
def samples(bench, workdir):
    """Two short VQA samples and two LLaVA conversations long enough to be truncated to 128 tokens."""
    small = (96, 72)
    vqa = bench.write_case(workdir, "vqa", 2, small)
    llava = bench.write_case(workdir, "llava", 2, small, llava_turns=6, answer_words=60)
    return {case: list(itertools.islice(bench.seeded_examples(paths), 2)) for case, paths in
            (("vqa", vqa), ("llava", llava))}


@pytest.mark.parametrize("llm", ["llama", "t5"])
def test_both_sides_agree_on_the_same_samples(bench, workdir, checkpoints, samples, llm):
    processors = bench.build_processors(llm, workdir, checkpoints[llm])
    for case, examples in samples.items():
        report = bench.check_agreement(processors, examples)
        assert report["transformers_pil"]["pixel_max_abs_diff"] < 1e-5
        assert report["transformers"]["llm_text_ids_identical"] and report["transformers"]["image_placeholders"] == 32
        if case == "llava":  # the left truncation of long instructions is part of what agrees
            assert report["truncated_instructions"] >= 1


def test_the_check_catches_a_diverging_side(bench, workdir, checkpoints, samples):
    processors = bench.build_processors("llama", workdir, checkpoints["llama"])
    examples = samples["llava"]
    # another instruction limit on transformers' side: long instructions keep fewer tokens
    processors["transformers"].tokenizer.model_max_length = 64
    with pytest.raises(bench.Disagreement, match="transformers: LLM input_ids"):
        bench.check_agreement(processors, examples)
    processors["transformers"].tokenizer.model_max_length = processors["ours"].max_instruction_length
    bench.check_agreement(processors, examples)
    # other normalisation statistics on our side: the pixels differ
    transform = processors["ours"].image_transform
    transform.mean = (0.5, 0.5, 0.5)
    with pytest.raises(bench.Disagreement, match="pixel values differ"):
        bench.check_agreement(processors, examples)
