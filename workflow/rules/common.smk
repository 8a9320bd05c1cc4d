# Shared helpers of the rules: the validated params and small target/input functions.
import gram.config

PARAMS = gram.config.from_dict(config, "params.yaml")
PROFILE = PARAMS.profile


wildcard_constraints:
    profile="|".join(gram.config.PROFILES),
    method="[a-z0-9-]+",


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


def eval_dirs(wildcards):
    return expand(
        "results/{profile}/eval/{method}",
        profile=wildcards.profile,
        method=config["grid"]["methods"],
    )


def report_targets():
    return [
        f"results/{PROFILE}/zero_shot.{ext}" for ext in ("md", "csv", "json", "png")
    ]
