"""Benchmark: CLIP text encoding with and without truncation to the longest EOS of the batch.

`gram.prompts.encoders.encode_text_embeds(clip, embeds, eos, truncate=True)` cuts the token sequences
to the longest EOS position of the batch before running the text transformer. Under the causal mask
no position up to an EOS can see the tokens after it, so the features do not change, only the work.
This script measures how much time that saves, and checks that the features really are the same.

Cases:

- `vitb16-c<C>`: a text tower the size of CLIP ViT-B/16's (context 77, width 512, 12 layers, 8 heads,
  MLP 2048, projection 512, vocabulary 49408), built from `transformers.CLIPConfig` with random
  weights (this machine has no hub access; timings do not depend on the weights). C class prompts
  shaped like "a photo of a {name}." with a 4-vector soft prompt in place of "a photo of a" and names
  of 1-6 tokens (EOS at position 7-12), padded to the full context as CLIP's tokenizer pads them.
  Token embeddings go straight into `encode_text_embeds`; no tokenizer is needed.
- `emoji-coop`: the emoji profile's own small CLIP (`--backbone`, default `models/emoji/backbone` when
  it exists) through `CoOp(bb, init="a {} emoji").text_features(names, truncate=...)`, with the class
  names of `data/emoji/datasets/subgroup.json`. `CoOp.prompt_ids` already pads only to the longest
  prompt of the batch, so here truncation has nothing left to cut and the ratio should be about 1.
- `emoji-full-context`: the same CoOp prompts padded to the model's full context and fed to
  `encode_text_embeds`, i.e. what truncation saves over fixed-length padding on that model.

For every case and for truncate=False/True it times (a) the forward pass under `torch.no_grad()` and
(b) forward + backward of `features.sum()` w.r.t. the soft prompt (the only tensor that requires a
gradient; the CLIP weights are frozen). Each timing is the median over `--repeats` runs after
`--warmup` runs; the two truncation settings alternate run by run so that background load hits both
alike. It asserts that the L2-normalised features of the two settings agree to `--atol` and records
that difference and the difference of the soft-prompt gradients.

Run from the repository root:

    python benchmarks/text_truncation.py                      # all cases, cuda if available
    python benchmarks/text_truncation.py --device cpu --classes 20 --repeats 3
    python benchmarks/text_truncation.py --device cuda --dtype bfloat16 --repeats 20

Results go to `benchmarks/results/text_truncation-<device>.json` (`--out` to change) and a table is
printed. See `benchmarks/README.md` for the fields.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere: make `gram` importable
    sys.path.insert(0, str(ROOT))

from benchenv import base_environment, device_and_dtype, sync  # noqa: E402
from gram.io import write_json  # noqa: E402
from gram.prompts.encoders import encode_text_embeds  # noqa: E402

# CLIP ViT-B/16 text tower (openai/clip-vit-base-patch16)
VITB16_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
VITB16_PROJECTION = 512
PERIOD_ID = 269  # "." in CLIP's BPE vocabulary
N_CTX = 4  # soft prompt standing in for "a photo of a"
# how many BPE tokens a class name takes (1..6); a rough ImageNet-like spread
NAME_TOKEN_WEIGHTS = [0.25, 0.30, 0.20, 0.12, 0.08, 0.05]

DEFAULT_BACKBONE = ROOT / "models" / "emoji" / "backbone"
DEFAULT_CLASSES_FILE = ROOT / "data" / "emoji" / "datasets" / "subgroup.json"


@dataclass
class Case:
    """One workload: `run(truncate)` returns normalised features [C, E]; `prompt` is the soft prompt."""

    name: str
    config: dict
    run: Callable[[bool], torch.Tensor]
    prompt: torch.Tensor
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    return dict(base_environment(device, dtype), transformers=transformers.__version__)



# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def vitb16_case(n_classes: int, device: torch.device, dtype: torch.dtype, seed: int) -> Case:
    """C prompts "[BOS] ctx*4 name . [EOS] pad..." through a random-weight ViT-B/16-sized text tower."""
    from transformers import CLIPConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(VITB16_TEXT, projection_dim=VITB16_PROJECTION), projection_dim=VITB16_PROJECTION)
    tcfg = cfg.text_config
    # the text tower with its projection is all encode_text_embeds touches: skip building the vision tower
    clip = CLIPTextModelWithProjection(tcfg).to(device=device, dtype=dtype)
    clip.requires_grad_(False).eval()
    context = tcfg.max_position_embeddings

    gen = torch.Generator().manual_seed(seed)
    name_len = torch.multinomial(torch.tensor(NAME_TOKEN_WEIGHTS), n_classes, replacement=True, generator=gen) + 1
    ids = torch.full((n_classes, context), tcfg.pad_token_id, dtype=torch.long)
    ids[:, 0] = tcfg.bos_token_id
    eos = torch.empty(n_classes, dtype=torch.long)
    for i, n in enumerate(name_len.tolist()):
        start = 1 + N_CTX
        ids[i, start:start + n] = torch.randint(0, 49400, (n,), generator=gen)  # the name's BPE tokens
        ids[i, start + n] = PERIOD_ID
        ids[i, start + n + 1] = tcfg.eos_token_id
        eos[i] = start + n + 1
    ids, eos = ids.to(device), eos.to(device)
    tok_emb = clip.text_model.embeddings.token_embedding
    with torch.no_grad():
        base = tok_emb(ids)  # [C, 77, 512]; the frozen part of every prompt
        ctx0 = tok_emb(torch.randint(0, 49400, (N_CTX,), generator=gen).to(device))
    prompt = ctx0.float().clone().requires_grad_(True)  # θ in fp32, as CoOp keeps it

    def run(truncate: bool) -> torch.Tensor:
        # splice the soft prompt in on every call, as CoOp does, so its gradient flows
        ctx = prompt.to(base.dtype).unsqueeze(0).expand(n_classes, -1, -1)
        emb = torch.cat([base[:, :1], ctx, base[:, 1 + N_CTX:]], dim=1)
        return F.normalize(encode_text_embeds(clip, emb, eos, truncate).float(), dim=-1)

    config = {
        "kind": "vitb16-random",
        "model": "CLIP ViT-B/16 text tower sizes, random weights (no hub access here; timings do not depend "
                 "on the weights)",
        "text_config": {k: getattr(tcfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                        "num_hidden_layers", "num_attention_heads",
                                                        "max_position_embeddings", "hidden_act")},
        "projection_dim": VITB16_PROJECTION,
        "attn_implementation": tcfg._attn_implementation,
        "classes": n_classes,
        "template": '"a photo of a {name}." with the 4 words before {name} as a soft prompt',
        "n_ctx": N_CTX,
        "name_tokens": {"min": int(name_len.min()), "max": int(name_len.max()),
                        "mean": round(float(name_len.float().mean()), 3), "weights_1_to_6": NAME_TOKEN_WEIGHTS},
        "eos": eos_stats(eos),
        "length_full": context,
        "length_truncated": int(eos.max()) + 1,
        "seed": seed,
    }
    return Case(f"vitb16-c{n_classes}", config, run, prompt)


def emoji_names(path: Path, tokenizer) -> tuple[list[str], str]:
    """Class names from a dataset JSON's `classes`, else words of the tokenizer's vocabulary."""
    if path.is_file():
        return list(json.loads(path.read_text())["classes"]), str(path)
    vocab = sorted(w for w in tokenizer.get_vocab() if not w.startswith("<"))[:200]
    names = [" ".join(vocab[i:i + 1 + i % 3]) for i in range(0, len(vocab) - 3, 2)]
    return names, "tokenizer vocabulary (no classes file)"


def emoji_cases(backbone_dir: Path, classes_file: Path, device: torch.device, dtype_name: str) -> list[Case]:
    """CoOp on the emoji CLIP: its own text_features path, and the same prompts padded to the full context."""
    from gram.backbone import load
    from gram.prompts.learners import CoOp

    bb = load(backbone_dir, device=str(device), dtype=dtype_name)
    learner = CoOp(bb, init="a {} emoji")
    names, source = emoji_names(classes_file, bb.tokenizer)
    tc = bb.model.config.text_config
    ids, eos = learner.prompt_ids(names)
    common = {
        "model": os.path.relpath(backbone_dir, ROOT) if os.path.isabs(str(backbone_dir)) else str(backbone_dir),
        "text_config": {k: getattr(tc, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                      "num_hidden_layers", "num_attention_heads",
                                                      "max_position_embeddings", "hidden_act")},
        "projection_dim": bb.model.config.projection_dim,
        "attn_implementation": tc._attn_implementation,
        "learner": 'CoOp(bb, init="a {} emoji")',
        "n_ctx": learner.n_ctx,
        "classes": len(names),
        "class_names_from": os.path.relpath(source, ROOT) if os.path.isabs(str(source)) else str(source),
        "eos": eos_stats(eos),
        "length_truncated": int(eos.max()) + 1,
    }

    coop = Case(
        "emoji-coop",
        dict(common, kind="emoji-coop", call="learner.text_features(names, truncate=...)",
             length_full=ids.shape[1]),
        lambda truncate: learner.text_features(names, truncate=truncate),
        learner.ctx,
        ["CoOp.prompt_ids pads to the longest prompt of the batch, so truncate=True has nothing to cut here"],
    )

    # the same prompts padded to the model's whole context, as a fixed-length tokenizer would pad them
    context = tc.max_position_embeddings
    padded = torch.full((len(names), context), learner.pad, dtype=torch.long)
    padded[:, :ids.shape[1]] = ids
    padded, eos_dev = padded.to(bb.device), eos.to(bb.device)
    tok_emb = bb.model.text_model.embeddings.token_embedding

    def run_full(truncate: bool) -> torch.Tensor:
        with torch.no_grad():
            emb = tok_emb(padded)
        ctx = learner.ctx.to(emb.dtype).unsqueeze(0).expand(len(names), -1, -1)
        emb = torch.cat([emb[:, :1], ctx, emb[:, 1 + learner.n_ctx:]], dim=1)
        return F.normalize(encode_text_embeds(bb.model, emb, eos_dev, truncate).float(), dim=-1)

    full = Case(
        "emoji-full-context",
        dict(common, kind="emoji-full-context", call="encode_text_embeds on the CoOp prompts padded to the context",
             length_full=context),
        run_full,
        learner.ctx,
    )
    return [coop, full]


def eos_stats(eos: torch.Tensor) -> dict:
    e = eos.float()
    return {"min": int(eos.min()), "max": int(eos.max()), "mean": round(float(e.mean()), 3)}


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def check(case: Case, atol: float) -> dict:
    """Features and soft-prompt gradients of truncate=False vs True; asserts the features agree."""
    with torch.no_grad():
        full, cut = case.run(False), case.run(True)
    diff = float((full - cut).abs().max())
    grads = []
    for truncate in (False, True):
        case.prompt.grad = None
        case.run(truncate).sum().backward()
        grads.append(case.prompt.grad.detach().float().clone())
    case.prompt.grad = None
    grad_diff = float((grads[0] - grads[1]).abs().max())
    assert diff <= atol, f"{case.name}: truncation changed the features by {diff:.3g} > {atol:g}"
    return {"max_abs_diff_features": diff, "max_abs_diff_prompt_grad": grad_diff,
            "grad_abs_max": float(grads[0].abs().max()), "atol": atol, "features_shape": list(full.shape)}


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(case: Case, repeats: int, warmup: int, device: torch.device) -> dict:
    def forward(truncate: bool) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                case.run(truncate)
        return step

    def forward_backward(truncate: bool) -> Callable[[], None]:
        def step() -> None:
            case.prompt.grad = None
            case.run(truncate).sum().backward()
        return step

    out = {}
    for mode, make in (("forward", forward), ("forward_backward", forward_backward)):
        steps = {False: make(False), True: make(True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(warmup):
            for truncate in (False, True):
                timed(steps[truncate], device)
        # alternate the two settings so that load from elsewhere falls on both
        for _ in range(repeats):
            for truncate in (False, True):
                times[truncate].append(timed(steps[truncate], device))
        full, cut = statistics.median(times[False]), statistics.median(times[True])
        out[mode] = {
            "full_s": full,
            "truncated_s": cut,
            "speedup": full / cut if cut > 0 else None,
            "full_runs_s": times[False],
            "truncated_runs_s": times[True],
        }
    case.prompt.grad = None
    return out


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    head = f"{'case':<20} {'C':>5} {'L full':>6} {'L cut':>5} {'mode':<17} {'full s':>9} {'cut s':>9} " \
           f"{'speedup':>7} {'max diff':>9}"
    rows = [head, "-" * len(head)]
    for r in results:
        cfg = r["config"]
        for mode, t in r["timings"].items():
            rows.append(f"{r['case']:<20} {cfg['classes']:>5} {cfg['length_full']:>6} {cfg['length_truncated']:>5} "
                        f"{mode:<17} {t['full_s']:>9.4f} {t['truncated_s']:>9.4f} {t['speedup']:>6.2f}x "
                        f"{r['check']['max_abs_diff_features']:>9.2e}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 only on CUDA (the CPU always runs float32)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per setting (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per setting first")
    p.add_argument("--classes", default="100,1000",
                   help="comma-separated class counts for the ViT-B/16-sized case ('' to skip it)")
    p.add_argument("--backbone", type=Path, default=None,
                   help=f"emoji CLIP directory (default {DEFAULT_BACKBONE.relative_to(ROOT)} when it exists; "
                        "'none' to skip)")
    p.add_argument("--classes-file", type=Path, default=DEFAULT_CLASSES_FILE,
                   help="dataset JSON whose `classes` are the emoji class names")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--atol", type=float, default=None,
                   help="largest allowed feature difference (default 1e-5 in float32, 1e-2 in bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/text_truncation-<device>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args)
    atol = args.atol if args.atol is not None else (1e-5 if dtype == torch.float32 else 1e-2)
    out = args.out or ROOT / "benchmarks" / "results" / f"text_truncation-{device.type}.json"

    cases: list[Case] = []
    skipped: list[str] = []
    for c in (s.strip() for s in args.classes.split(",")):
        if c:
            cases.append(vitb16_case(int(c), device, dtype, args.seed))
    backbone = args.backbone if args.backbone is not None else DEFAULT_BACKBONE
    if str(backbone).lower() == "none":
        skipped.append("emoji: --backbone none")
    elif (backbone / "config.json").is_file():
        cases.extend(emoji_cases(backbone, args.classes_file, device, str(dtype).removeprefix("torch.")))
    else:
        skipped.append(f"emoji: no backbone at {backbone}")
        print(f"note: no emoji backbone at {backbone}; skipping the emoji cases", file=sys.stderr)

    results = []
    for case in cases:
        print(f"{case.name}: checking, then timing ({args.warmup} warm-up + {args.repeats} runs per setting)",
              file=sys.stderr, flush=True)
        chk = check(case, atol)
        timings = measure(case, args.repeats, args.warmup, device)
        results.append({"case": case.name, "config": case.config, "check": chk, "timings": timings,
                        "notes": case.notes})

    report = {
        "benchmark": "text_truncation",
        "what": "seconds per call of CLIP text encoding with truncate=False (full padded length) and truncate=True "
                "(cut to the longest EOS of the batch); speedup = full_s / truncated_s; medians over repeats",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "environment": environment(device, dtype),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "weights": "vitb16 cases: random weights, no hub access on the measuring machine; "
                   "emoji cases: the trained emoji backbone",
        "skipped": skipped,
        "results": results,
    }
    write_json(out, report)
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
