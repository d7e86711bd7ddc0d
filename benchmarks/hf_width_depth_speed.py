"""Measured speed-up against parameter reduction for a Llama causal LM (grouped-query attention),
pruned in width (half the key-value groups with their query heads, half the MLP neurons, every
layer) or in depth (half the layers, the ones of lowest ShortGPT block influence), side by side in
one process (interleaved timing, one thread). Weights are fresh: latency and parameters do not
depend on training.

    PYTHONPATH=$PWD python benchmarks/hf_width_depth_speed.py [--hidden 256 --layers 8 ...]
"""
from __future__ import annotations

import argparse
import copy

import torch

from evaluators.hf import importance, pruning
from evaluators.hf.models import build_model
from evaluators.measure import interleaved_latency_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = build_model({"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.intermediate,
                         "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                         "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
                         "max_position_embeddings": max(128, args.seq_len), "use_cache": False}, "causal_lm").eval()
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    width = copy.deepcopy(dense)
    scores = importance.unit_scores(width, pruning.discover(width), "magnitude")
    for u in pruning.discover(width):
        if u.kind == "heads":
            pruning.prune_heads(width, u.name, pruning.heads_to_keep(u, scores[u.name], u.size // 2, "kv_groups"))
        elif u.kind == "neurons":
            pruning.prune_neurons(width, u.name, torch.argsort(scores[u.name], descending=True)[: u.size // 2].tolist())

    depth = copy.deepcopy(dense)
    pruning.drop_layers(depth, importance.layers_to_drop(depth, args.layers // 2, [{"input_ids": x}]))

    models = {"dense": dense, "width/2": width, "depth/2": depth}
    stats = interleaved_latency_ms({k: (lambda m=m: m(x)) for k, m in models.items()},
                                   rounds=args.rounds, warmup=3, repeats=10, threads=1)
    base_params, base_ms = pruning.parameter_count(dense), stats["dense"]["latency_ms"]
    tokens = args.batch * args.seq_len
    print(f"llama hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} kv heads, "
          f"MLP {args.intermediate}, vocab {args.vocab}; batch {args.batch} x {args.seq_len} tokens, 1 thread")
    print(f"{'model':8} {'params':>10} {'params x':>9} {'ms':>8} {'tok/s':>9} {'speed-up':>9} {'speed-up / param cut':>21}")
    for name, model in models.items():
        params, ms = pruning.parameter_count(model), stats[name]["latency_ms"]
        param_cut, speedup = base_params / params, base_ms / ms
        print(f"{name:8} {params:>10,} {param_cut:>9.2f} {ms:>8.2f} {tokens / ms * 1000:>9,.0f} {speedup:>9.2f} "
              f"{(speedup / param_cut) if name != 'dense' else 1.0:>21.2f}")


if __name__ == "__main__":
    main()
