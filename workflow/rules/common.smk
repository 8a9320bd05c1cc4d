# Shared helpers of the rules: the validated params and small target/input functions.
import gram.config

# a profile with its own grid (paper.grid) fans out over it, also under --config profile=NAME
if config.get(config["profile"], {}).get("grid"):
    config["grid"] = config[config["profile"]]["grid"]
PARAMS = gram.config.from_dict(config, "params.yaml")
PROFILE = PARAMS.profile


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


def section(*keys):
    """Input function: the params section at profile/keys (as `params:`, it triggers reruns)."""

    def get(wildcards):
        node = config[wildcards.profile]
        for k in keys:
            node = node[k]
        return node

    return get


def sources(*names):
    """The package files a stage's code lives in (changes to them rerun the stage)."""
    out = []
    for name in names:
        path = Path("gram") / name
        out += (
            sorted(str(p) for p in path.rglob("*.py")) if path.is_dir() else [str(path)]
        )
    return out


def method_params(wildcards):
    """Input function: the recipe of the tuned method (as `params:`, a change reruns its jobs)."""
    return config[wildcards.profile]["methods"][wildcards.method]


def meta_params(wildcards):
    """Input function: the meta-training recipe (as `params:`, a change reruns its job)."""
    return config[wildcards.profile]["meta"][wildcards.recipe]


def gram_meta(method):
    """The meta recipe of a GRAM method (grid.gram), or None for a plain method."""
    return {e["method"]: e["meta"] for e in config["grid"].get("gram", [])}.get(method)


def meta_input(wildcards):
    """Input function: the meta-train output a GRAM method's tuning reads (none for plain methods)."""
    recipe = gram_meta(wildcards.method)
    return [f"models/{wildcards.profile}/meta/{recipe}"] if recipe else []


def meta_arg(wildcards):
    """The `--meta DIR` argument of a GRAM method's tuning command (empty for plain methods)."""
    recipe = gram_meta(wildcards.method)
    return f" --meta models/{wildcards.profile}/meta/{recipe}" if recipe else ""
