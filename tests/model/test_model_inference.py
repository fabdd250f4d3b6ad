"""Video inputs and candidate ranking."""

from __future__ import annotations

import pytest
import torch

from conftest import LLM_KINDS, PROMPTS  # noqa: E402

CANDIDATES = ["yes", "no", "a red square"]


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_video_concatenates_frame_queries_frame_major(kind, our_models, images):
    model = our_models[kind]
    frames = [images[0], images[1], images[0].transpose(0)]
    video = model.processor.generation_batch([frames, frames[::-1]], ["what happens in the video", "why"])
    assert video["pixel_values"].shape[:2] == (2, 3)
    with torch.no_grad():
        visual = model.encode_images(video["pixel_values"], video["qformer_input_ids"], video["qformer_attention_mask"])
        num_queries = model.config.num_query_tokens
        assert visual.shape == (2, 3 * num_queries, model.llm.hidden_size)
        # Each frame goes through the Q-Former with the sample's instruction: frame t's queries sit at [tQ, (t+1)Q).
        for t in range(3):
            single = model.encode_images(
                video["pixel_values"][:, t], video["qformer_input_ids"], video["qformer_attention_mask"]
            )
            torch.testing.assert_close(visual[:, t * num_queries : (t + 1) * num_queries], single, rtol=1e-5, atol=1e-6)
        reordered = video["pixel_values"][:, [2, 1, 0]]
        swapped = model.encode_images(reordered, video["qformer_input_ids"], video["qformer_attention_mask"])
        assert not torch.allclose(swapped, visual)
        if kind == "t5":  # score the first decoder step
            video["decoder_input_ids"] = torch.zeros(2, 1, dtype=torch.long)
        # what the forward hands the LLM: these frame-major visual tokens, in the order the frames came. (Not its
        # logits: a tiny random LLM's last logits move by about 1e-7 whatever its visual input, within allclose.)
        handed = []
        hook = model.llm.register_forward_pre_hook(lambda module, args: handed.append(args[0]))
        try:
            logits = model(**video).logits
            model(**{**video, "pixel_values": reordered})
        finally:
            hook.remove()
    torch.testing.assert_close(handed[0], visual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(handed[1], swapped, rtol=1e-5, atol=1e-6)
    if kind == "llama":
        assert logits.shape[1] == 3 * num_queries + video["input_ids"].shape[1]
    answers = model.generate([frames, frames], "what happens", max_new_tokens=3, num_beams=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def _hand_scores(model, image, prompt, candidates):
    """Summed log-probabilities of each candidate, one unpadded sequence at a time, from the forward logits."""
    processor, tokenizer = model.processor, model.processor.tokenizer
    batch = processor.generation_batch([image], [prompt])
    scores = []
    for candidate in candidates:
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            if model.llm.kind == "decoder_only":
                input_ids = torch.cat([batch["input_ids"], torch.tensor([ids])], dim=1)
                logits = model(**{**batch, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}).logits
                start = logits.shape[1] - len(ids) - 1  # the position that predicts the first candidate token
                log_probs = logits[0, start : start + len(ids)].log_softmax(-1)
                targets = ids
            else:
                targets = ids + [tokenizer.eos_token_id]
                logits = model(**batch, labels=torch.tensor([targets])).logits
                log_probs = logits[0].log_softmax(-1)
        scores.append(sum(log_probs[i, token].item() for i, token in enumerate(targets)))
    return scores


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_rank_equals_summed_token_log_likelihoods(kind, our_models, images):
    model = our_models[kind]
    shared = model.rank(images, PROMPTS, CANDIDATES, batch_size=4)  # chunks cut across samples
    per_sample = model.rank(images, PROMPTS, [CANDIDATES, CANDIDATES[:2]])
    assert [len(s) for s in shared] == [3, 3] and [len(s) for s in per_sample] == [3, 2]
    for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
        expected = _hand_scores(model, image, prompt, CANDIDATES)
        assert shared[i] == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert per_sample[i] == pytest.approx(expected[: len(per_sample[i])], rel=1e-5, abs=1e-4)
    assert all(score < 0 for row in shared for score in row)
