"""``python -m sae_allocators.workflow.demo DIR``: a tiny local model and dataset to try the workflow offline.

Writes ``DIR/tiny-gpt2`` (a random 2-layer GPT-2, d_model 32, with a 100-word tokenizer: load it
with ``--model_class_name AutoModelForCausalLM --model_name DIR/tiny-gpt2``) and
``DIR/tiny-text`` (a parquet text dataset: ``--dataset_path DIR/tiny-text --is_dataset_tokenized False``).
Nothing is downloaded. The SAEs trained on them mean nothing: they exercise the commands.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path


def make_assets(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    import datasets
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = Path(root)
    model_dir, data_dir = root / "tiny-gpt2", root / "tiny-text"
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(96)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    rng = random.Random(seed)
    rows = [" ".join(f"w{rng.randrange(96)}" for _ in range(40)) for _ in range(200)]
    data_dir.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"text": rows}).to_parquet(str(data_dir / "train.parquet"))
    return model_dir, data_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m sae_allocators.workflow.demo DIR")
    m, d = make_assets(sys.argv[1])
    print(f"model: {m}\ndataset: {d}")
