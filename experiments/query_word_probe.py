"""How much the demo's query outputs look like the words its LLM reads: for each spatial statement of the test split,
the cosine of every projected query (the LLM's input space) with the LLM's input embedding of the named shape's
colour, kind and side words, against the other colours, kinds and the opposite side; and how well a linear probe
reads the shape's column from the mean query.

    PYTHONPATH=src .venv/bin/python experiments/query_word_probe.py outputs/demo/instruct/hf [samples=120]
                                                                    [out=experiments/results/query_word_probe-DATE.json]

Why: the LLM judges a statement from the scene text by finding words in it; what the Q-Former hands it in the scene
text's place may carry a shape's side (linearly decodable) without carrying it as anything near the side's word.
The checkpoint's world is the one the script's checkout builds (``tasks.build``), so run it in the checkout whose
demo wrote the checkpoint. Prints one JSON line and writes it to ``out``.
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def probe(checkpoint: str, samples: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    from instructblip import InstructBlip
    from instructblip.data import templates
    from instructblip.shapesworld import tasks, world

    model = InstructBlip.from_pretrained(checkpoint, dtype_policy="float32").eval()
    processor = model.processor
    table = model.llm.hf_model.get_input_embeddings().weight.detach()

    words = [*world.COLORS, *world.SHAPES, *world.SIDES]
    ids = [processor.tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
    for word, word_ids in zip(words, ids):
        if len(word_ids) != 1:
            raise SystemExit(f"query_word_probe.py: {word!r} is {len(word_ids)} tokens of the LLM's tokenizer, not one")
    vectors = torch.nn.functional.normalize(table[[word_ids[0] for word_ids in ids]], dim=-1)

    sums: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        sums.setdefault(key, []).append(value)

    means, columns = [], []
    for index in range(samples):
        record, image, _ = tasks.build("shapesworld_spatial", "test", index, 0)
        _, color, kind = record.text.split()[:3]   # "the red square is ...": the statement's subject
        shape = next(s for s in world.Scene.from_dict(record.extra["scene"]).shapes
                     if (s.color, s.kind) == (color, kind))
        instruction, _ = templates.render_evaluation(record)
        with torch.no_grad():
            queries = model.encode_images(processor.pixel_values([image]), **processor.qformer_batch([instruction]))[0]
        # the highest cosine of any query with each word's input embedding
        best = dict(zip(words, (torch.nn.functional.normalize(queries, dim=-1) @ vectors.T).amax(0).tolist()))
        others = [best[c] for c in world.COLORS if c != shape.color]
        add("colour", best[shape.color])
        add("other colours (mean)", sum(others) / len(others))
        add("colour above every other colour", float(best[shape.color] > max(others)))
        kinds = [best[k] for k in world.SHAPES if k != shape.kind]
        add("kind", best[shape.kind])
        add("other kinds (mean)", sum(kinds) / len(kinds))
        for side in world.sides(shape):
            add("side", best[side])
            add("opposite side", best[world.OPPOSITE_SIDE[side]])
            add("side above the opposite side", float(best[side] > best[world.OPPOSITE_SIDE[side]]))
        means.append(queries.mean(0))
        columns.append(shape.cell[1])
    result = {key: round(sum(values) / len(values), 3) for key, values in sums.items()}
    result["n"] = {key: len(values) for key, values in sums.items()}
    features, labels = torch.stack(means).numpy(), torch.tensor(columns).numpy()
    train = (2 * samples) // 3
    classifier = LogisticRegression(max_iter=2000).fit(features[:train], labels[:train])
    result["column from the mean query, linear probe, held-out accuracy"] = round(
        float(classifier.score(features[train:], labels[train:])), 3)
    return result


def main(argv: list[str]) -> None:
    if not argv or "=" in argv[0]:
        raise SystemExit(__doc__)
    checkpoint, args = argv[0], dict(arg.split("=", 1) for arg in argv[1:])
    samples = int(args.pop("samples", 120))
    out = Path(args.pop("out", REPO / "experiments" / "results" / f"query_word_probe-{date.today()}.json"))
    if args:
        raise SystemExit(f"query_word_probe.py: unknown {', '.join(args)}; allowed: samples, out")
    torch.set_num_threads(1)
    result = {"date": str(date.today()), "command": " ".join(["experiments/query_word_probe.py", *argv]),
              "cosine_max_over_queries": probe(checkpoint, samples)}
    print(json.dumps(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
