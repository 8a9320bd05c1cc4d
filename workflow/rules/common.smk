# Shared helpers of the rules: the validated params and small target/input functions.
import gram.config

PARAMS = gram.config.from_dict(config, "params.yaml")
PROFILE = PARAMS.profile


wildcard_constraints:
    profile="|".join(gram.config.PROFILES),
    method="[a-z0-9-]+",
    dataset="[A-Za-z0-9_]+",
    shots="[0-9]+",
    seed="[0-9]+",


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


def run_files(wildcards):
    """Every tuned run the grid asks for (the report's inputs)."""
    grid, prot = config["grid"], config[wildcards.profile]["protocols"]
    base = "results/{profile}/runs/{protocol}/{dataset}/{method}/k{shots}-s{seed}.json"
    out = []
    if not grid["tuned"]:
        return out
    for ds in grid["datasets"]:
        out += expand(
            base,
            profile=wildcards.profile,
            protocol="few-shot",
            dataset=ds,
            method=grid["tuned"],
            shots=grid["shots"],
            seed=grid["seeds"],
        )
        out += expand(
            base,
            profile=wildcards.profile,
            protocol="base-to-new",
            dataset=ds,
            method=grid["tuned"],
            shots=grid["base_to_new_shots"],
            seed=grid["seeds"],
        )
    for protocol, key in (
        ("cross-dataset", "cross_dataset"),
        ("domain-generalisation", "domain_generalisation"),
    ):
        if prot[key]:
            out += expand(
                base,
                profile=wildcards.profile,
                protocol=protocol,
                dataset=grid["transfer"]["dataset"],
                method=grid["tuned"],
                shots=grid["transfer"]["shots"],
                seed=grid["seeds"],
            )
    return out


def eval_dirs(wildcards):
    return expand(
        "results/{profile}/eval/{method}",
        profile=wildcards.profile,
        method=config["grid"]["methods"],
    )


PROTOCOL_TABLES = ["few_shot", "base_to_new", "cross_dataset", "domain_generalisation"]


def report_targets():
    out = [f"results/{PROFILE}/zero_shot.{ext}" for ext in ("md", "csv", "json", "png")]
    out += [f"results/{PROFILE}/{name}.md" for name in PROTOCOL_TABLES]
    out += [f"results/{PROFILE}/clustering.{ext}" for ext in ("md", "csv", "png")]
    return out + [f"data/{PROFILE}/tasks", f"data/{PROFILE}/prototypes"]
