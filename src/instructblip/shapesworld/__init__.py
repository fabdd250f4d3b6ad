"""ShapesWorld: a procedurally generated world of coloured shapes and written words, with exact ground truth.

It stands in for the real recipe stage by stage, with nothing downloaded (see ``instructblip.demo``):
``world`` draws and renders scenes and clips, ``tasks`` turns them into the held-in and held-out task datasets
(registered in ``instructblip.data.registry`` on import, ``world="shapesworld"``), ``text`` writes the world's text
corpus, ``tokenizer`` trains the tiny LLM's tokenizer, ``vision`` and ``language`` pretrain the tiny image encoder
(open_clip, contrastive) and the tiny causal LM.
"""

from instructblip.shapesworld import tasks  # noqa: F401  (registers the datasets)
