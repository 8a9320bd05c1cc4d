# Shared helpers of the rules: the validated params, the stage table (gram/stages.py) as rule
# directives, and small target/input functions.
import gram.config
import gram.io
import gram.stages

# a profile with its own grid (paper.grid) fans out over it, also under --config profile=NAME
if config.get(config["profile"], {}).get("grid"):
    config["grid"] = config[config["profile"]]["grid"]
PARAMS = gram.config.from_dict(config, "params.yaml")
PROFILE = PARAMS.profile
# a directory output whose files changed since its stage wrote them (truncated shard, other weights,
# deleted split file) loses its manifest, a declared output: the stage and its dependants rerun
gram.io.drop_stale_manifests(gram.stages.manifest_globs())


wildcard_constraints:
    profile="|".join(gram.config.PROFILES),
    method="[a-z0-9+-]+",
    recipe="[a-z0-9-]+",
    dataset="[A-Za-z0-9_]+",
    shots="[0-9]+",
    seed="[0-9]+",


def img2dataset_enabled(profile):
    return PARAMS.active(profile).data.paper.img2dataset.enabled


def img2dataset_summary(wildcards):
    """Input function: the opt-in img2dataset run's summary, when the profile enables it."""
    from gram.data.img2dataset import summary_path

    profile = PROFILE if wildcards is None else wildcards.profile
    cfg = PARAMS.active(profile).data.paper.img2dataset
    return [str(summary_path(cfg.output))] if cfg.enabled else []


def sources(*names):
    """The package files a stage's code lives in (changes to them rerun the stage)."""
    out = []
    for name in names:
        path = Path("gram") / name
        out += (
            sorted(str(p) for p in path.rglob("*.py")) if path.is_dir() else [str(path)]
        )
    return out


def stage_cmd(name):
    """The rule's shell command: the table's, with {wildcards.X}, {log} and {params.extra}."""
    return gram.stages.smk_template(gram.stages.stage(name).cmd)


def stage_log(name):
    return gram.stages.stage(name).log


def _supplied(name, kind, want, given):
    if set(want) - set(given):
        raise ValueError(
            f"the rule of stage {name!r} lacks the {kind} {sorted(set(want) - set(given))} that gram/stages.py needs"
        )


def stage_inputs(name, **functions):
    """The rule's inputs: the table's (code, data and their manifests), then `functions`, which
    must cover the table's fan-in and per-fan inputs (and may add Snakemake-only ones).
    """
    _supplied(name, "input functions", gram.stages.rule_functions(name)[0], functions)
    return {**gram.stages.smk_inputs(name), **functions}


def stage_params(name, **functions):
    """The rule's params (a change reruns its jobs): each params key of the table, `grid...` from
    the fan-out grid, the rest from the profile's section ({var}: a wildcard); then `functions`.
    """
    _supplied(name, "params functions", gram.stages.rule_functions(name)[1], functions)
    out = {}
    for key in gram.stages.stage(name).params:
        slug = key.replace(".", "_").replace("{", "").replace("}", "")
        if key.split(".")[0] == "grid":
            out[slug] = _walk(config, key.split("."))
        else:
            out[slug] = _section_of(key)
    return {**out, **functions}


def _walk(node, keys):
    for k in keys:
        node = node[k]
    return node


def _section_of(key):
    return lambda wildcards: _walk(
        config[wildcards.profile], key.format(**wildcards).split(".")
    )


def report_entry(name, category, subcategory=None):
    """What `snakemake --report` shows of an output: its caption file and category."""
    extra = {"subcategory": subcategory} if subcategory else {}
    return dict(caption=f"../report/{name}.rst", category=category, **extra)


def stage_outputs(name, **reports):
    """The rule's outputs: directories (each followed by its manifest) and files, those named in
    `reports` wrapped as `report(path, **reports[name])`."""
    out = {}
    for key, (path, is_dir) in gram.stages.smk_outputs(name).items():
        if is_dir:
            out[key] = directory(path)
        elif key in reports:
            out[key] = report(path, **reports[key])
        else:
            out[key] = path
    return out


def gram_meta(method):
    """The meta recipe of a GRAM method (grid.gram), or None for a plain method."""
    return {e["method"]: e["meta"] for e in config["grid"].get("gram", [])}.get(method)


def meta_input(wildcards):
    """Input function: the meta-train output a GRAM method's tuning reads (none for plain methods)."""
    recipe = gram_meta(wildcards.method)
    return with_manifest(f"models/{wildcards.profile}/meta/{recipe}") if recipe else []


def with_manifest(directory):
    """A directory input and its manifest (a change to the directory's files reruns the job)."""
    return [directory, str(gram.io.manifest_path(directory))]


def meta_arg(wildcards):
    """The `--meta DIR` argument of a GRAM method's tuning command (empty for plain methods)."""
    recipe = gram_meta(wildcards.method)
    return f" --meta models/{wildcards.profile}/meta/{recipe}" if recipe else ""
