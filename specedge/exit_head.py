"""Early exits: a guess of the target's next token from an intermediate layer.

The exit head reads the residual stream after `layer` layers. Untrained, it is the
model's own final norm and output head applied there (a "logit lens"); trained
(`specedge cloud train-exit-head`), a low-rank residual adapter in front of them
learns to map the intermediate state towards the last layer's, by distillation
from the model's own final predictions on a text corpus. The output head stays
frozen and shared, so a trained head is a few hundred kilobytes.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from specedge.model import INVARIANT_BLOCK, Qwen2


class ExitHeadError(ValueError):
    pass


def default_exit_layer(n_layers: int) -> int:
    """Three quarters of the depth: late enough to guess, early enough to leave a quarter of the pass."""
    return max(1, n_layers * 3 // 4)


@dataclass
class ExitHead:
    model: Qwen2
    layer: int  # reads the residual stream after this many layers
    down: torch.Tensor | None = None  # [rank, hidden]: the adapter, None = the plain output head
    up: torch.Tensor | None = None  # [hidden, rank]

    def __post_init__(self):
        n = self.model.cfg.n_layers
        if not 1 <= self.layer < n:
            raise ExitHeadError(f"exit layer {self.layer} outside 1..{n - 1} for a {n}-layer target")

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden, None if self.down is None else (self.down, self.up))

    def save(self, path: str | Path, meta: dict) -> None:
        from safetensors.torch import save_file

        if self.down is None:
            raise ExitHeadError("an untrained exit head has nothing to save")
        info = {"layer": str(self.layer), "hidden": str(self.model.cfg.dim), "meta": json.dumps(meta)}
        save_file({"down": self.down.contiguous(), "up": self.up.contiguous()}, str(path), metadata=info)


def load_exit_head(model: Qwen2, layer: int, path: str | Path | None = None) -> ExitHead:
    """The plain head at `layer`, or a trained one from `path` (its layer wins; checked against the model)."""
    if not path:
        return ExitHead(model, layer)
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ExitHeadError(f"exit head {path} does not exist; train one with `specedge cloud train-exit-head`")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
            down, up = f.get_tensor("down").float(), f.get_tensor("up").float()
        layer = int(info["layer"])
    except Exception as exc:  # a corrupted or foreign file: say which
        raise ExitHeadError(f"exit head {path} is unreadable: {exc}") from exc
    hidden = model.cfg.dim
    if down.ndim != 2 or down.shape[1] != hidden or up.shape != (hidden, down.shape[0]):
        raise ExitHeadError(f"exit head {path} is for a hidden size of {down.shape[-1]}, the target has {hidden}")
    return ExitHead(model, layer, down, up)


def hidden_states(model: Qwen2, tokens: list[int], layers: list[int]):
    """Teacher-forced pass over `tokens`: ({layer: residual rows}, final logits argmax)."""
    cache = model.new_cache(capacity=len(tokens) + 8)
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    final = []

    def grab(index, x):
        if index in seen:
            seen[index].append(x.clone())

    for start in range(0, len(tokens), INVARIANT_BLOCK):
        final.append(model.forward(tokens[start:start + INVARIANT_BLOCK], cache, on_layer=grab).argmax(-1))
    return {layer: torch.cat(rows) for layer, rows in seen.items()}, torch.cat(final)


def layer_agreement(model: Qwen2, sequences: list[tuple[list[int], int]], layers: list[int],
                    heads: dict[int, ExitHead] | None = None) -> dict[int, float]:
    """How often each layer's exit head names the same next token as the full model, over every
    position of each (tokens, skip) sequence after its first `skip` (teacher forcing)."""
    agree = {layer: 0 for layer in layers}
    total = 0
    for tokens, skip in sequences:
        states, final = hidden_states(model, tokens, layers)
        final = final[skip:]
        total += final.numel()
        for layer in layers:
            head = (heads or {}).get(layer) or ExitHead(model, layer)
            agree[layer] += int((head.logits(states[layer][skip:]).argmax(-1) == final).sum())
    return {layer: agree[layer] / total if total else 0.0 for layer in layers}


def block_influence(model: Qwen2, sequences: list[list[int]]) -> list[float]:
    """Per layer, 1 - the mean cosine similarity of the residual stream before and after it
    (ShortGPT's block influence): the layers that change it least are the ones to leave out."""
    n = model.cfg.n_layers
    total = torch.zeros(n, dtype=torch.float64)
    rows = 0
    for tokens in sequences:
        states, _ = hidden_states(model, tokens, list(range(n)))
        for i in range(n - 1):
            total[i] += torch.nn.functional.cosine_similarity(states[i].float(), states[i + 1].float(), dim=-1).sum()
        rows += len(tokens)
    influence = (1 - total / rows).tolist()
    influence[-1] = float("inf")  # the last layer's output is not read here: never a candidate
    return influence


def corpus_passages(tokenizer, paths: list[str] | None, passages: int, length: int) -> list[list[int]]:
    """`passages` token sequences of `length` tokens from text files, or by default from the Python
    standard library's own sources (code and prose, in the coder target's domain; PSF licence,
    freely redistributable, shipped with every Python): sorted, so the corpus is reproducible."""
    import sysconfig

    files = [Path(p) for p in paths] if paths else sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out: list[list[int]] = []
    for path in files:
        try:
            ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            raise ExitHeadError(f"corpus file {path}: {exc}") from exc
        for start in range(0, len(ids) - length + 1, length):
            out.append(ids[start:start + length])
            if len(out) >= passages:
                return out
    if not out:
        raise ExitHeadError(f"the corpus has no passage of {length} tokens")
    return out


def train_exit_head(model: Qwen2, sequences: list[list[int]], layer: int, rank: int = 32, steps: int = 300,
                    lr: float = 3e-3, candidates: int = 2048, seed: int = 0, log=None) -> tuple[ExitHead, dict]:
    """Fit the adapter by distillation: cross-entropy of the exit's logits against the full model's
    next token, over a candidate set of output rows (the final top tokens of the batch plus
    random ones) so a step never multiplies through the whole vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    held_out = max(1, len(sequences) // 10)
    train_seqs, test_seqs = sequences[held_out:], sequences[:held_out]
    xs, ys = [], []
    for tokens in train_seqs:
        states, final = hidden_states(model, tokens, [layer])
        xs.append(states[layer].float())
        ys.append(final)
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    hidden, vocab = model.cfg.dim, model.cfg.vocab_size
    down = (torch.randn(rank, hidden, generator=gen) / hidden ** 0.5).requires_grad_()
    up = torch.zeros(hidden, rank, requires_grad=True)
    head_w = model.head.dense_weight()
    norm_w = model.norm.float()
    eps = model.cfg.norm_eps
    opt = torch.optim.Adam([down, up], lr=lr)
    batch = min(256, x_all.shape[0])
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        cand = torch.unique(torch.cat([y, torch.randint(0, vocab, (candidates,), generator=gen)]))
        target = torch.searchsorted(cand, y)
        h = x + (x @ down.T) @ up.T
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_w
        loss = torch.nn.functional.cross_entropy(h @ head_w[cand].T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    head = ExitHead(model, layer, down.detach(), up.detach())
    report = {"layer": layer, "rank": rank, "steps": steps, "train_positions": int(x_all.shape[0]),
              "agreement_plain": layer_agreement(model, [(t, 0) for t in test_seqs], [layer])[layer],
              "agreement_trained": layer_agreement(model, [(t, 0) for t in test_seqs], [layer],
                                                   heads={layer: head})[layer]}
    return head, report



# -- the `specedge cloud` commands about exits and layers (argument tables: cloud/serve.py) -------
def least_influential(influence: list[float], drop: int) -> list[int]:
    """The `drop` layers whose removal changes the residual stream least, in layer order. The first
    and last layers are never candidates: every model needs them most."""
    return sorted(sorted(range(1, len(influence) - 1), key=lambda i: influence[i])[:drop])


def prune_layers_command(args) -> int:
    """Print each layer's block influence, then the registry entry of a version without the
    --drop least influential ones."""
    from specedge.loader import load_named

    model, tok = load_named(args.target, "bf16", batch_invariant=True)
    influence = block_influence(model, corpus_passages(tok, args.corpus, args.passages, args.length))
    drop = least_influential(influence, args.drop)
    name = args.name or f"{args.target}-pruned{len(influence) - len(drop)}"
    print(json.dumps({"influence": [round(v, 5) for v in influence], "drop_layers": drop}), flush=True)
    print(f'\n[versions."{name}"]\nmodel = "{args.target}"\nweights = "bf16"\ndrop_layers = {drop}')
    return 0


def train_exit_head_command(args) -> int:
    from specedge.loader import load_named

    model, tok = load_named(args.target, args.target_weights)
    layer = args.layer or default_exit_layer(model.cfg.n_layers)
    sequences = corpus_passages(tok, args.corpus, args.passages, args.length)
    print(f"training an exit head after layer {layer}/{model.cfg.n_layers} of {args.target} on "
          f"{len(sequences)} passages of {args.length} tokens", file=sys.stderr, flush=True)
    head, report = train_exit_head(model, sequences, layer, args.rank, args.steps, seed=args.seed,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    head.save(args.out, {"target": args.target, "weights": args.target_weights, **report})
    print(json.dumps({"out": args.out, **report}), flush=True)
    return 0


def agreement_layers(n_layers: int, layers: str | None) -> list[int]:
    """--layers as given (comma-separated), else every 4th layer, the default exit layer and n - 2."""
    if layers:
        return sorted({int(x) for x in layers.split(",")})
    n = n_layers
    return sorted(x for x in set(range(4, n, 4)) | {default_exit_layer(n), n - 2} if 1 <= x < n)


def exit_agreement_command(args) -> int:
    """Per layer: how often the exit head there names the full model's next token (teacher forcing)."""
    from specedge.loader import load_named

    model, _ = load_named(args.target, args.target_weights)
    runs = json.loads(Path(args.sequences).read_text())
    n = model.cfg.n_layers
    layers = agreement_layers(n, args.layers)
    heads = {}
    if args.exit_head:
        head = load_exit_head(model, 1, args.exit_head)
        heads[head.layer] = head
    rates = layer_agreement(model, [(r["tokens"], r["skip"]) for r in runs], layers)
    out = {"layers": n, "positions": sum(len(r["tokens"]) - r["skip"] for r in runs),
           "agreement": {str(k): v for k, v in rates.items()}}
    if heads:
        layer = next(iter(heads))
        out["trained"] = {str(layer): layer_agreement(model, [(r["tokens"], r["skip"]) for r in runs], [layer],
                                                      heads=heads)[layer]}
    print(json.dumps(out), flush=True)
    return 0
