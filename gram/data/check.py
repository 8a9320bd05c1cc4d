"""`gram check-data`: is every paper-profile dataset in place and readable? [ours]

    gram check-data --root DIR [--datasets imagenet,dtd,...] [--decode N] [--json PATH]

For each dataset of `gram.data.fewshot.SPECS` (or those named) it reads every split's listing
and prints one row: `present` with the item count per split and the number of classes,
`missing` (its folder is absent) or `malformed` with the first error found. `--decode N` also
decodes the first N images of every split, which catches truncated or corrupt files.
The exit status is 0 only when every requested dataset is present and well-formed.
`--params`/`--profile` are accepted like every stage's but not used: the root is explicit.
"""

from __future__ import annotations

from gram.data.fewshot import SPECS, DatasetMissing, decode, read
from gram.io import setup_logging, write_json
from gram.stage import stage_parser

SPLITS = ("train", "val", "test")
DECODE_SIZE = 32  # decoding only proves the file is readable; keep the resize cheap


def check(root: str, name: str, n_decode: int = 0) -> dict:
    """Status of one dataset: {"status", "splits": {split: n}, "classes", "reason"}."""
    row: dict = {"dataset": name, "status": "present", "splits": {}, "classes": None, "reason": ""}
    try:
        for split in SPECS[name].splits:
            listing = read(root, name, split)
            row["splits"][split] = len(listing)
            row["classes"] = len(listing.classes)
            if n_decode:
                decode(listing, DECODE_SIZE, indices=range(min(n_decode, len(listing))))
    except DatasetMissing as e:
        row.update(status="missing", reason=str(e))
    except (OSError, ValueError) as e:
        row.update(status="malformed", reason=str(e))
    return row


def table(rows: list[dict]) -> str:
    """An aligned text table; the reason column is last and left unpadded."""
    head = ["dataset", "status", *SPLITS, "classes", "reason"]
    cells = [[r["dataset"], r["status"], *(str(r["splits"].get(s, "-")) for s in SPLITS),
              "-" if r["classes"] is None else str(r["classes"]), r["reason"]] for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head) - 1)]
    right = {2, 3, 4, 5}  # counts are right-aligned
    lines = []
    for c in [head, *cells]:
        parts = [c[i].rjust(w) if i in right else c[i].ljust(w) for i, w in enumerate(widths)]
        lines.append("  ".join(parts + [c[-1]]).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("check-data", __doc__)
    p.add_argument("--root", required=True, help="folder holding the dataset folders (CoOp's $DATA)")
    p.add_argument("--datasets", default=",".join(SPECS), help="comma-separated names (default: all)")
    p.add_argument("--decode", type=int, default=0, metavar="N", help="also decode the first N images per split")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    setup_logging(args.log, args.verbose)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise ValueError(f"--datasets: unknown {', '.join(unknown)}; expected some of {', '.join(SPECS)}")
    rows = [check(args.root, n, args.decode) for n in names]
    print(table(rows))
    ok = all(r["status"] == "present" for r in rows)
    if args.json:
        write_json(args.json, {"root": args.root, "ok": ok, "datasets": rows})
    if not ok:
        raise SystemExit(1)
