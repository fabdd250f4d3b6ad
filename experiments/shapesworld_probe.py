"""Where does a demo model lose the written word? Linear probes of the OCR word on each stage of the hand-over.

For ``n`` fresh OCR scenes (train-split generator, indices past the demo's shards) it reads out, without training
anything in the model: the vision features (all tokens, flattened), the token of the cell the word is drawn in, the
Q-Former's query outputs (flattened) and their projection into the LLM (the visual tokens the LLM reads). A
logistic regression is fitted on 75% and scored on the rest; chance is 1/8 (the world has 8 words).

    python experiments/shapesworld_probe.py outputs/demo instruct          # the instruction-tuned model
    python experiments/shapesworld_probe.py outputs/demo stage2 --blip2    # BLIP-2 stage 2 (no instruction input)
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from instructblip.demo import Demo, DemoSettings
from instructblip.shapesworld import tasks
from instructblip.shapesworld.world import WORDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a demo output folder (outputs/demo)")
    parser.add_argument("run", help="a training run in it: stage1, stage2, instruct, ...")
    parser.add_argument("--blip2", action="store_true", help="the run has no instruction input (stage 1/2)")
    parser.add_argument("-n", type=int, default=1000, help="scenes probed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Demo(DemoSettings(out=args.out, progress=False)).load_trained(args.run, not args.blip2).eval()

    images, prompts, words, cells = [], [], [], []
    for i in range(args.n):
        record, image, _ = tasks.build("shapesworld_ocr_vqa", "train", 10_000_000 + i, 0)
        row, col = record.extra["scene"]["word"]["cell"]
        images.append(image), prompts.append(record.question)
        words.append(WORDS.index(record.answers[0])), cells.append(1 + 3 * row + col)  # token 0: class token

    features: dict[str, list[torch.Tensor]] = {"vision": [], "word cell token": [], "queries": [], "projected": []}
    with torch.no_grad():
        for start in range(0, args.n, 64):
            batch = model.processor.generation_batch(images[start:start + 64], prompts[start:start + 64])
            vision = model.vision(batch["pixel_values"])
            queries = model.query_outputs(batch["pixel_values"], batch["qformer_input_ids"],
                                          batch["qformer_attention_mask"])
            cell = torch.tensor(cells[start:start + 64])
            features["vision"].append(vision.flatten(1))
            features["word cell token"].append(vision[torch.arange(len(cell)), cell])
            features["queries"].append(queries.flatten(1))
            features["projected"].append(model.projection(queries).flatten(1))

    labels, cut = np.array(words), int(0.75 * args.n)
    scores = {}
    for name, parts in features.items():
        x = torch.cat(parts).numpy()
        probe = LogisticRegression(max_iter=2000).fit(x[:cut], labels[:cut])
        scores[name] = round(float(probe.score(x[cut:], labels[cut:])), 3)
    print(json.dumps({"out": args.out, "run": args.run, "n": args.n, "chance": 1 / len(WORDS), "accuracy": scores}))


if __name__ == "__main__":
    main()
