"""`gram dvc`: the one table of pipeline stages that dvc.yaml and the Snakemake rules are made from. [ours]

Every stage of the pipeline is one `Stage` below: its command (one line, `{var}` placeholders), the
module that runs it, its data inputs, the params sections it reads, its outputs, its log and its
fan-out. Two renderers read the table:

- `dvc_yaml()` writes dvc.yaml (`gram dvc`, drift-tested like the params schema): `{profile}` becomes
  `${profile}`, each fan-out variable a `${item.X}` of the stage's `matrix:` or the grid expression
  the fan binds it to; a stage with several fans (plain and GRAM methods) becomes one DVC stage each.
- workflow/rules/common.smk's `stage_cmd`, `stage_inputs`, `stage_params`, `stage_outputs` and
  `stage_log` give the Snakemake rule of the same name (`-` becomes `_`): `{var}` becomes
  `{wildcards.var}`, and a fan's `{extra}` argument `{params.extra}`, an input function of the rule.

Paths ending in `/` are directories written by a stage. Each has a manifest beside it,
`<dir>.manifest.json` (`gram.io.write_manifest`: sha256, size and mtime_ns of every file), written
by the stage at its end and declared as an output to both tools; Snakemake rules depend on an input
directory's manifest, and common.smk removes a manifest that no longer matches its directory, so a
truncated shard or a changed backbone reruns the stage that wrote it (DVC hashes directories itself).

Code dependencies are not listed by hand: they are the files of the package that the stage's module
imports, directly or through other modules, at the top or inside functions (`code_deps`), less the
shared plumbing in `PLUMBING` (params changes rerun a stage through its `params`, not through config.py).
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from gram.io import MANIFEST_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gram"
PLUMBING = {"gram", "gram.cli", "gram.config", "gram.stage", "gram.__main__"}  # every stage imports these
DVC_DEFAULT = "dvc.yaml"


@dataclass(frozen=True)
class Fan:
    """One DVC stage of a table entry: how its fan-out variables are bound (one Snakemake rule covers all)."""

    suffix: str = ""  # the DVC stage is named <stage name><suffix>
    matrix: dict = field(default_factory=dict)  # DVC matrix: variable -> grid key (str) or a literal list
    bind: dict = field(default_factory=dict)  # template variable -> DVC expression (item.entry.method, grid.x)
    extra: str = ""  # what `{extra}` in the command is for this fan (Snakemake: the rule's params.extra)
    deps: dict = field(default_factory=dict)  # further inputs of this fan (Snakemake: the rule's input functions)


@dataclass(frozen=True)
class Stage:
    name: str  # DVC stage name; the Snakemake rule is the same with `-` as `_`
    module: str  # the module whose main() runs the stage; its imports are the code deps
    cmd: str  # one line: `gram <stage> --params params.yaml --profile {profile} ... --log {log}`
    log: str  # the log file (Snakemake log:, DVC has it in the command only)
    params: tuple = ()  # params keys: `grid...` at the top level, the rest under the profile; may hold {var}
    inputs: dict = field(default_factory=dict)  # data inputs: name -> path (ends in / for a directory)
    gather: dict = field(default_factory=dict)  # fan-in: name -> the DVC directory; Snakemake lists the files
    outputs: dict = field(default_factory=dict)  # name -> path (ends in / for a directory)
    fans: tuple = (Fan(),)
    metrics: tuple = ()  # names of outputs that DVC shows as metrics
    plots: dict = field(default_factory=dict)  # name of an output -> DVC plot properties

    @property
    def rule(self) -> str:
        return self.name.replace("-", "_")


_DATASETS, _SHARDS, _BACKBONE = "data/{profile}/datasets/", "data/{profile}/shards/", "models/{profile}/backbone/"
_TUNED = {"datasets": _DATASETS, "shards": _SHARDS, "backbone": _BACKBONE}
_TUNE_PARAMS = ("methods.{method}", "protocols", "backbone.device", "backbone.dtype")
_GRAM = {"method": "item.entry.method", "recipe": "item.entry.meta"}
_META_ARG = " --meta models/{profile}/meta/{recipe}"
_META_DEP = {"meta": "models/{profile}/meta/{recipe}/"}
_RUN = "{dataset}/{method}/k{shots}-s{seed}"
_TRANSFER = {"dataset": "grid.transfer.dataset", "shots": "grid.transfer.shots"}
_TPT = "results/{profile}/tpt/{dataset}/{method}/s{seed}.json"

STAGES: tuple[Stage, ...] = (
    Stage("download", "gram.data.download",
          "gram download --params params.yaml --profile {profile} --out data/{profile} --log {log}",
          log="logs/{profile}/download.log", params=("data",),
          outputs={"shards": _SHARDS, "datasets": _DATASETS, "report": "data/{profile}/download.json"}),
    Stage("backbone", "gram.backbone",
          "gram backbone --params params.yaml --profile {profile} --data data/{profile} "
          "--out models/{profile}/backbone --log {log}",
          log="logs/{profile}/backbone.log", params=("backbone", "data.vendors.pretrain"),
          inputs={"shards": _SHARDS, "datasets": _DATASETS}, outputs={"backbone": _BACKBONE}),
    Stage("embed", "gram.embed",
          "gram embed --params params.yaml --profile {profile} --data data/{profile} "
          "--backbone models/{profile}/backbone --out data/{profile}/embed --log {log}",
          log="logs/{profile}/embed.log",
          params=("embed", "data.vendors.meta", "backbone.device", "backbone.dtype"),
          inputs={"shards": _SHARDS, "backbone": _BACKBONE}, outputs={"embed": "data/{profile}/embed/"}),
    Stage("cluster", "gram.cluster",
          "gram cluster --params params.yaml --profile {profile} --data data/{profile} "
          "--embed data/{profile}/embed --out data/{profile}/chc --log {log}",
          log="logs/{profile}/cluster.log", params=("cluster", "data.vendors.meta", "backbone.device"),
          inputs={"shards": _SHARDS, "embed": "data/{profile}/embed/"}, outputs={"chc": "data/{profile}/chc/"}),
    Stage("tasks", "gram.tasks",
          "gram tasks --params params.yaml --profile {profile} --chc data/{profile}/chc --data data/{profile} "
          "--out data/{profile}/tasks --log {log}",
          log="logs/{profile}/tasks.log", params=("tasks",),
          inputs={"shards": _SHARDS, "chc": "data/{profile}/chc/"}, outputs={"tasks": "data/{profile}/tasks/"}),
    Stage("prototypes", "gram.prototypes",
          "gram prototypes --params params.yaml --profile {profile} --embed data/{profile}/embed "
          "--chc data/{profile}/chc --out data/{profile}/prototypes --log {log}",
          log="logs/{profile}/prototypes.log", params=("prototypes", "data.vendors.meta"),
          inputs={"embed": "data/{profile}/embed/", "chc": "data/{profile}/chc/"},
          outputs={"prototypes": "data/{profile}/prototypes/"}),
    Stage("evaluate", "gram.evaluate",
          "gram evaluate --params params.yaml --profile {profile} --method {method} --data data/{profile} "
          "--backbone models/{profile}/backbone --out results/{profile}/eval/{method} --log {log}",
          log="logs/{profile}/evaluate-{method}.log",
          params=("evaluate", "protocols", "backbone.device", "backbone.dtype", "grid.datasets", "grid.transfer"),
          inputs={"datasets": _DATASETS, "shards": _SHARDS, "backbone": _BACKBONE},
          outputs={"eval": "results/{profile}/eval/{method}/"},
          fans=(Fan(matrix={"method": "grid.methods"}),)),
    # tuned methods under the four protocols; GRAM methods (grid.gram) also read their recipe's output
    Stage("few-shot", "gram.tune",
          "gram tune --params params.yaml --profile {profile} --protocol few-shot --dataset {dataset} "
          "--method {method} --shots {shots} --seed {seed} --data data/{profile} "
          "--backbone models/{profile}/backbone --out results/{profile}/runs/few-shot/" + _RUN + ".json "
          "--save-prompt models/{profile}/prompts/" + _RUN + ".safetensors{extra} --log {log}",
          log="logs/{profile}/few-shot/" + _RUN + ".log", params=_TUNE_PARAMS, inputs=_TUNED,
          outputs={"run": "results/{profile}/runs/few-shot/" + _RUN + ".json",
                   "prompt": "models/{profile}/prompts/" + _RUN + ".safetensors"},
          fans=(Fan(matrix={"dataset": "grid.datasets", "method": "grid.tuned", "shots": "grid.shots",
                            "seed": "grid.seeds"}),
                Fan("-gram", {"dataset": "grid.datasets", "entry": "grid.gram", "shots": "grid.shots",
                              "seed": "grid.seeds"}, _GRAM, _META_ARG, _META_DEP))),
    Stage("base-to-new", "gram.tune",
          "gram tune --params params.yaml --profile {profile} --protocol base-to-new --dataset {dataset} "
          "--method {method} --shots {shots} --seed {seed} --data data/{profile} "
          "--backbone models/{profile}/backbone --out results/{profile}/runs/base-to-new/" + _RUN + ".json"
          "{extra} --log {log}",
          log="logs/{profile}/base-to-new/" + _RUN + ".log", params=_TUNE_PARAMS, inputs=_TUNED,
          outputs={"run": "results/{profile}/runs/base-to-new/" + _RUN + ".json"},
          fans=(Fan(matrix={"dataset": "grid.datasets", "method": "grid.tuned", "seed": "grid.seeds"},
                    bind={"shots": "grid.base_to_new_shots"}),
                Fan("-gram", {"dataset": "grid.datasets", "entry": "grid.gram", "seed": "grid.seeds"},
                    {**_GRAM, "shots": "grid.base_to_new_shots"}, _META_ARG, _META_DEP))),
    # cross-dataset and domain generalisation score the few-shot prompt of grid.transfer, untuned
    Stage("transfer", "gram.tune",
          "gram tune --params params.yaml --profile {profile} --protocol {protocol} --dataset {dataset} "
          "--method {method} --shots {shots} --seed {seed} --data data/{profile} "
          "--backbone models/{profile}/backbone --out results/{profile}/runs/{protocol}/" + _RUN + ".json "
          "--load-prompt models/{profile}/prompts/" + _RUN + ".safetensors --log {log}",
          log="logs/{profile}/{protocol}/" + _RUN + ".log", params=_TUNE_PARAMS,
          inputs={**_TUNED, "prompt": "models/{profile}/prompts/" + _RUN + ".safetensors"},
          outputs={"run": "results/{profile}/runs/{protocol}/" + _RUN + ".json"},
          fans=(Fan(matrix={"protocol": ["cross-dataset", "domain-generalisation"], "method": "grid.tuned",
                            "seed": "grid.seeds"}, bind=_TRANSFER),
                Fan("-gram", {"protocol": ["cross-dataset", "domain-generalisation"], "entry": "grid.gram",
                              "seed": "grid.seeds"}, {**_TRANSFER, "method": "item.entry.method"}))),
    Stage("meta", "gram.meta",
          "gram meta --params params.yaml --profile {profile} --recipe {recipe} --data data/{profile} "
          "--chc data/{profile}/chc --tasks data/{profile}/tasks --prototypes data/{profile}/prototypes "
          "--backbone models/{profile}/backbone --out models/{profile}/meta/{recipe} --log {log}",
          log="logs/{profile}/meta-{recipe}.log",
          params=("meta.{recipe}", "data.vendors.meta", "backbone.device", "backbone.dtype"),
          inputs={"shards": _SHARDS, "datasets": _DATASETS, "chc": "data/{profile}/chc/", "tasks": "data/{profile}/tasks/",
                  "prototypes": "data/{profile}/prototypes/", "backbone": _BACKBONE},
          outputs={"meta": "models/{profile}/meta/{recipe}/"},
          fans=(Fan(matrix={"recipe": "grid.meta"}),)),
    # test-time tuning: from words, from a few-shot prompt of grid.transfer, or from a meta-training output
    Stage("tpt", "gram.tpt",
          "gram tpt --params params.yaml --profile {profile} --dataset {dataset} --method {method} --seed {seed} "
          "--data data/{profile} --backbone models/{profile}/backbone --prototypes data/{profile}/prototypes "
          "--views-cache results/{profile}/.tpt-views --out " + _TPT + "{extra} --log {log}",
          log="logs/{profile}/tpt/{dataset}/{method}/s{seed}.log",
          params=("tpt", "backbone.device", "backbone.dtype"),
          inputs={**_TUNED, "prototypes": "data/{profile}/prototypes/"}, outputs={"run": _TPT},
          fans=(Fan(matrix={"dataset": "grid.tpt.datasets", "method": "grid.tpt.words", "seed": "grid.seeds"}),
                Fan("-tuned", {"dataset": "grid.tpt.datasets", "entry": "grid.tpt.tuned", "seed": "grid.seeds"},
                    {"method": "item.entry.method", "prompt": "item.entry.prompt", "tdataset": "grid.transfer.dataset",
                     "tshots": "grid.transfer.shots"},
                    " --prompt models/{profile}/prompts/{tdataset}/{prompt}/k{tshots}-s{seed}.safetensors",
                    {"extra": "models/{profile}/prompts/{tdataset}/{prompt}/k{tshots}-s{seed}.safetensors"}),
                Fan("-gram", {"dataset": "grid.tpt.datasets", "entry": "grid.tpt.gram", "seed": "grid.seeds"},
                    {"method": "item.entry.method", "recipe": "item.entry.meta"}, _META_ARG,
                    {"extra": "models/{profile}/meta/{recipe}/"}))),
    Stage("tpt-report", "gram.report",
          "gram tpt-report --params params.yaml --profile {profile} --tpt results/{profile}/tpt "
          "--out results/{profile} --log {log}",
          log="logs/{profile}/tpt-report.log", params=("grid.tpt", "grid.seeds", "tpt.domains"),
          gather={"runs": "results/{profile}/tpt"},
          outputs={"md": "results/{profile}/test_time.md", "csv": "results/{profile}/test_time.csv",
                   "png": "results/{profile}/test_time.png",
                   "timings": "results/{profile}/test_time_timings.csv"}),
    Stage("report", "gram.report",
          "gram report --params params.yaml --profile {profile} --eval results/{profile}/eval "
          "--runs results/{profile}/runs --backbone models/{profile}/backbone --chc data/{profile}/chc "
          "--meta models/{profile}/meta --out results/{profile} --log {log}",
          log="logs/{profile}/report.log", params=("grid", "evaluate", "data.vendors", "protocols"),
          inputs={"backbone": _BACKBONE, "chc": "data/{profile}/chc/"},
          gather={"evals": "results/{profile}/eval", "runs": "results/{profile}/runs",
                  "meta": "models/{profile}/meta"},
          outputs={f"{name}_{ext}": f"results/{{profile}}/{name}.{ext}" for name, exts in (
              ("zero_shot", ("md", "csv", "json", "png")), ("backbone", ("png",)),
              ("few_shot", ("md", "csv", "png")), ("base_to_new", ("md", "csv")),
              ("cross_dataset", ("md", "csv")), ("domain_generalisation", ("md", "csv")),
              ("paired", ("md",)), ("protocols", ("json",)), ("runs", ("csv",)),
              ("clustering", ("md", "csv", "png")),
              ("meta_training", ("md", "png")), ("timings", ("csv",))) for ext in exts},
          metrics=("zero_shot_json", "protocols_json"),
          plots={"zero_shot_csv": {"x": "domain", "y": "balanced_accuracy"},
                 "few_shot_csv": {"x": "shots", "y": "mean"}}),
)

BY_NAME = {s.name: s for s in STAGES}
BY_RULE = {s.rule: s for s in STAGES}


def stage(name: str) -> Stage:
    """The stage of a DVC stage name or a Snakemake rule name."""
    found = BY_NAME.get(name) or BY_RULE.get(name)
    if found is None:
        raise KeyError(f"no stage {name!r} in gram/stages.py (one of {', '.join(BY_NAME)})")
    return found


def is_dir(path: str) -> bool:
    return path.endswith("/")


def manifest_of(path: str) -> str:
    """The manifest of a directory output (`data/x/shards/` -> `data/x/shards.manifest.json`)."""
    return path.rstrip("/") + MANIFEST_SUFFIX


# --------------------------------------------------------------------------------------------
# code dependencies: the import closure of a stage's module
# --------------------------------------------------------------------------------------------
def module_file(module: str) -> Path | None:
    """The source file of a module of the package (`gram.a` -> gram/a.py or gram/a/__init__.py), or None
    (not a module: e.g. a name defined in a package)."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def absolute_module(name: str, importer: str, is_package: bool, level: int) -> str:
    """The absolute name of `from <level dots><name> import ...` written in module `importer`."""
    if not level:
        return name
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def import_statements(path: Path, module: str) -> list[tuple[str, list[str]]]:
    """Every import in the file `path` of module `module`, anywhere (function bodies too), as (absolute
    module, imported names): `import a.b` is ("a.b", []), `from .x import f, g` in gram.a.b is
    ("gram.a.x", ["f", "g"])."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute_module(node.module or "", module, is_package, node.level)
            out.append((base, [a.name for a in node.names]))
    return out


def _imports(module: str) -> set[str]:
    """The package modules `module` imports anywhere in its file (function bodies too): `import gram.a.b`
    and `from gram.a import b` (a submodule) name gram.a.b, `from gram.a import name` names gram.a.
    Importing gram.a.b runs gram/a/__init__.py too, unless the importer is inside gram.a already."""
    found = set()
    for base, names in import_statements(module_file(module), module):
        if not names:  # import gram.a.b
            found.add(base)
        for name in names:  # from gram.a import b: the submodule gram.a.b, or a name defined in gram.a
            found.add(f"{base}.{name}" if module_file(f"{base}.{name}") else base)
    inside = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    out = set()
    for name in found:
        if name.split(".")[0] != PACKAGE or module_file(name) is None:
            continue
        parts = name.split(".")
        out.add(name)
        out.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p not in inside)
    return out - {module}


@cache
def code_deps(module: str) -> tuple[str, ...]:
    """The package files (relative paths, sorted) that running `module` may import, directly or through
    other package modules, at the top or inside functions, less PLUMBING."""
    seen, todo = set(), [module]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(_imports(mod))
    return tuple(sorted(str(module_file(m).relative_to(ROOT)) for m in seen - PLUMBING))


# --------------------------------------------------------------------------------------------
# Snakemake (workflow/rules/common.smk wraps these)
# --------------------------------------------------------------------------------------------
def smk_template(text: str) -> str:
    """`text` as a Snakemake shell command: {wildcards.X}, {log}, and the rule's {params.extra}."""
    keep = {"log": "{log}", "extra": "{params.extra}"}
    return _VAR.sub(lambda m: keep.get(m.group(1), "{wildcards." + m.group(1) + "}"), text)


def smk_inputs(name: str) -> dict:
    """The rule's inputs from the table: `code` (the package files), then each data input, a directory
    followed by its manifest (`<name>_manifest`); fan-in and per-fan inputs are the rule's functions."""
    st = stage(name)
    out: dict = {"code": list(code_deps(st.module))}
    for key, path in st.inputs.items():
        out[key] = path.rstrip("/")
        if is_dir(path):
            out[key + "_manifest"] = manifest_of(path)
    return out


def smk_outputs(name: str) -> dict:
    """output name -> (path, is a directory); a directory's manifest follows it as `<name>_manifest`."""
    out = {}
    for key, path in stage(name).outputs.items():
        out[key] = (path.rstrip("/"), is_dir(path))
        if is_dir(path):
            out[key + "_manifest"] = (manifest_of(path), False)
    return out


def rule_functions(name: str) -> tuple[set, set]:
    """(input names, params names) that the Snakemake rule supplies as functions: the fan-in
    (gather) and per-fan inputs, and `extra` when a fan adds an argument."""
    st = stage(name)
    inputs = set(st.gather) | {k for f in st.fans for k in f.deps}
    return inputs, ({"extra"} if any(f.extra for f in st.fans) else set())


def manifest_globs() -> list[str]:
    """Glob patterns of every directory output's manifest, over all profiles and fan-outs."""
    return sorted({_VAR.sub("*", manifest_of(p)) for st in STAGES for p in st.outputs.values() if is_dir(p)})


# --------------------------------------------------------------------------------------------
# dvc.yaml
# --------------------------------------------------------------------------------------------
_VAR = re.compile(r"\{(\w+)\}")


def dvc_template(text: str, fan: Fan, log: str = "") -> str:
    """`text` with DVC's interpolation: ${profile}, ${item.X} of the matrix, the fan's bound expressions."""

    def sub(m: re.Match) -> str:
        var = m.group(1)
        if var == "profile":
            return "${profile}"
        if var == "log":
            return dvc_template(log, fan)
        if var == "extra":
            return dvc_template(fan.extra, fan)
        if var in fan.bind:
            return "${" + fan.bind[var] + "}"
        if var in fan.matrix:
            return "${item." + var + "}"
        raise KeyError(f"{text!r}: {{{var}}} is neither a matrix variable nor bound by the fan")

    return _VAR.sub(sub, text)


def _param_key(key: str) -> str:
    return key if key.split(".")[0] == "grid" else "{profile}." + key


def dvc_stages() -> dict:
    """The `stages:` mapping of dvc.yaml."""
    out = {}
    for st in STAGES:
        for fan in st.fans:
            d: dict = {}
            if fan.matrix:
                d["matrix"] = {k: v if isinstance(v, list) else "${" + v + "}" for k, v in fan.matrix.items()}
            d["cmd"] = dvc_template(st.cmd, fan, st.log)
            paths = [*st.inputs.values(), *fan.deps.values(), *st.gather.values()]
            d["deps"] = list(code_deps(st.module)) + [dvc_template(p.rstrip("/"), fan) for p in paths]
            d["params"] = [dvc_template(_param_key(k), fan) for k in st.params]
            outs, shown = [], set(st.metrics) | set(st.plots)
            for name, p in st.outputs.items():
                if name not in shown:
                    outs.append(dvc_template(p.rstrip("/"), fan))
                    if is_dir(p):
                        outs.append(dvc_template(manifest_of(p), fan))
            d["outs"] = outs
            if st.metrics:
                d["metrics"] = [dvc_template(st.outputs[n], fan) for n in st.metrics]
            if st.plots:
                d["plots"] = [{dvc_template(st.outputs[n], fan): dict(props)} for n, props in st.plots.items()]
            out[st.name + fan.suffix] = d
    return out


def render_dvc() -> str:
    import yaml

    head = ("# Generated from gram/stages.py by `gram dvc`; do not edit by hand (tests/test_pipeline_parity.py\n"
            "# checks it). The same stages as the Snakemake rules (workflow/rules/*.smk), running the same `gram`\n"
            "# commands. The active profile is `profile:` in params.yaml (`dvc exp run -S profile=NAME`).\n")
    return head + yaml.safe_dump({"stages": dvc_stages()}, sort_keys=False, width=10_000)


def main(argv: list[str] | None = None) -> None:
    from gram.io import write_text

    p = argparse.ArgumentParser(prog="gram dvc", description="write dvc.yaml from the stage table (gram/stages.py)")
    p.add_argument("--out", default=DVC_DEFAULT, help=f"where to write it (default: {DVC_DEFAULT}; - prints it)")
    out = p.parse_args(argv).out
    if out == "-":
        print(render_dvc(), end="")
    else:
        write_text(out, render_dvc())


if __name__ == "__main__":
    main()
