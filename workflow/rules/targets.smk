# The grid's fan-out: which runs, evaluations and test-time jobs the reports read, and the targets
# of `rule all` (kept apart from common.smk's params and input functions; rules live elsewhere).


def tuned_methods():
    """Plain tuned methods, then the GRAM methods: every method with tuned runs."""
    return list(config["grid"]["tuned"]) + [
        e["method"] for e in config["grid"].get("gram", [])
    ]


def run_files(wildcards):
    """Every tuned run the grid asks for (the report's inputs)."""
    grid, prot = config["grid"], config[wildcards.profile]["protocols"]
    base = "results/{profile}/runs/{protocol}/{dataset}/{method}/k{shots}-s{seed}.json"
    out = []
    methods = tuned_methods()
    if not methods:
        return out
    for ds in grid["datasets"]:
        out += expand(
            base,
            profile=wildcards.profile,
            protocol="few-shot",
            dataset=ds,
            method=methods,
            shots=grid["shots"],
            seed=grid["seeds"],
        )
        out += expand(
            base,
            profile=wildcards.profile,
            protocol="base-to-new",
            dataset=ds,
            method=methods,
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
                method=methods,
                shots=grid["transfer"]["shots"],
                seed=grid["seeds"],
            )
    return out


def eval_dirs(wildcards):
    """The zero-shot evaluations of grid.methods, each with its manifest."""
    return [
        p
        for m in config["grid"]["methods"]
        for p in with_manifest(f"results/{wildcards.profile}/eval/{m}")
    ]


def meta_dirs(wildcards):
    """The meta-training outputs of grid.meta (the report's meta-training table)."""
    return [
        p
        for r in config["grid"].get("meta", [])
        for p in with_manifest(f"models/{wildcards.profile}/meta/{r}")
    ]


def tpt_entries():
    """(method, what it reads) of grid.tpt: None, ("prompt", tuned method) or ("meta", recipe)."""
    t = config["grid"].get("tpt", {})
    out = {m: None for m in t.get("words", [])}
    out.update({e["method"]: ("prompt", e["prompt"]) for e in t.get("tuned", [])})
    out.update({e["method"]: ("meta", e["meta"]) for e in t.get("gram", [])})
    return out


def tpt_input(wildcards):
    """Input function: the few-shot prompt or meta-training output a test-time method reads."""
    src = tpt_entries().get(wildcards.method)
    if src is None:
        return []
    if src[0] == "meta":
        return with_manifest(f"models/{wildcards.profile}/meta/{src[1]}")
    tr = config["grid"]["transfer"]
    return [
        f"models/{wildcards.profile}/prompts/{tr['dataset']}/{src[1]}/k{tr['shots']}-s{wildcards.seed}.safetensors"
    ]


def tpt_arg(wildcards):
    """The `--prompt PATH` / `--meta DIR` argument of a test-time job (empty for words-init methods)."""
    src = tpt_entries().get(wildcards.method)
    return "" if src is None else f" --{src[0]} {tpt_input(wildcards)[0]}"


def tpt_files(wildcards):
    """Every test-time run of grid.tpt (the test-time table's inputs)."""
    return expand(
        "results/{profile}/tpt/{dataset}/{method}/s{seed}.json",
        profile=wildcards.profile,
        dataset=config["grid"].get("tpt", {}).get("datasets", []),
        method=list(tpt_entries()),
        seed=config["grid"]["seeds"],
    )


PROTOCOL_TABLES = ["few_shot", "base_to_new", "cross_dataset", "domain_generalisation"]


def report_targets():
    out = [f"results/{PROFILE}/zero_shot.{ext}" for ext in ("md", "csv", "json", "png")]
    out += [f"results/{PROFILE}/{name}.md" for name in PROTOCOL_TABLES]
    out += [f"results/{PROFILE}/clustering.{ext}" for ext in ("md", "csv", "png")]
    out += [f"results/{PROFILE}/meta_training.{ext}" for ext in ("md", "png")]
    out += [
        m
        for r in config["grid"].get("meta", [])
        for m in with_manifest(f"models/{PROFILE}/meta/{r}")
    ]
    t = config["grid"].get("tpt", {})
    if t.get("datasets") and tpt_entries():
        out += [f"results/{PROFILE}/test_time.{ext}" for ext in ("md", "csv", "png")]
    # directory targets with their manifests: a changed directory reruns the stage that writes it
    return (
        out
        + with_manifest(f"data/{PROFILE}/tasks")
        + with_manifest(f"data/{PROFILE}/prototypes")
    )
