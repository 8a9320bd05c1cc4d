# Tuned methods under the four protocols: one job per (protocol, dataset, method, shots, seed).
# GRAM methods (grid.gram) also read the meta-train output of their recipe (`--meta`).
# Few-shot jobs also keep the tuned prompt; cross-dataset and domain-generalisation jobs score the
# prompt of grid.transfer without tuning.


rule few_shot:
    input:
        sources(
            "tune.py",
            "backbone.py",
            "data/__init__.py",
            "data/datasets.py",
            "data/fetch.py",
            "data/fewshot.py",
            "data/names.py",
            "data/paper.py",
            "data/shards.py",
            "evaluate.py",
            "images.py",
            "io.py",
            "prompts",
            "regulator.py",
            "tensorio.py",
        ),
        datasets="data/{profile}/datasets",
        shards="data/{profile}/shards",
        backbone="models/{profile}/backbone",
        meta=meta_input,
    output:
        run="results/{profile}/runs/few-shot/{dataset}/{method}/k{shots}-s{seed}.json",
        prompt="models/{profile}/prompts/{dataset}/{method}/k{shots}-s{seed}.safetensors",
    log:
        "logs/{profile}/few-shot/{dataset}/{method}/k{shots}-s{seed}.log",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, tuned_images, backbone=4),
        runtime=240,
        gpu=1,
    params:
        method=method_params,
        protocols=section("protocols"),
        device=section("backbone", "device"),
        dtype=section("backbone", "dtype"),
        meta=meta_arg,
    shell:
        "gram tune --params params.yaml --profile {wildcards.profile} --protocol few-shot --dataset {wildcards.dataset} --method {wildcards.method} --shots {wildcards.shots} --seed {wildcards.seed} --data data/{wildcards.profile} --backbone models/{wildcards.profile}/backbone --out {output.run} --save-prompt {output.prompt}{params.meta} --log {log}"


rule base_to_new:
    input:
        sources(
            "tune.py",
            "backbone.py",
            "data/__init__.py",
            "data/datasets.py",
            "data/fetch.py",
            "data/fewshot.py",
            "data/names.py",
            "data/paper.py",
            "data/shards.py",
            "evaluate.py",
            "images.py",
            "io.py",
            "prompts",
            "regulator.py",
            "tensorio.py",
        ),
        datasets="data/{profile}/datasets",
        shards="data/{profile}/shards",
        backbone="models/{profile}/backbone",
        meta=meta_input,
    output:
        "results/{profile}/runs/base-to-new/{dataset}/{method}/k{shots}-s{seed}.json",
    log:
        "logs/{profile}/base-to-new/{dataset}/{method}/k{shots}-s{seed}.log",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, tuned_images, backbone=4),
        runtime=240,
        gpu=1,
    params:
        method=method_params,
        protocols=section("protocols"),
        device=section("backbone", "device"),
        dtype=section("backbone", "dtype"),
        meta=meta_arg,
    shell:
        "gram tune --params params.yaml --profile {wildcards.profile} --protocol base-to-new --dataset {wildcards.dataset} --method {wildcards.method} --shots {wildcards.shots} --seed {wildcards.seed} --data data/{wildcards.profile} --backbone models/{wildcards.profile}/backbone --out {output}{params.meta} --log {log}"


rule transfer:
    input:
        sources(
            "tune.py",
            "backbone.py",
            "data/__init__.py",
            "data/datasets.py",
            "data/fetch.py",
            "data/fewshot.py",
            "data/names.py",
            "data/paper.py",
            "data/shards.py",
            "evaluate.py",
            "images.py",
            "io.py",
            "prompts",
            "regulator.py",
            "tensorio.py",
        ),
        datasets="data/{profile}/datasets",
        shards="data/{profile}/shards",
        backbone="models/{profile}/backbone",
        prompt="models/{profile}/prompts/{dataset}/{method}/k{shots}-s{seed}.safetensors",
    output:
        "results/{profile}/runs/{protocol}/{dataset}/{method}/k{shots}-s{seed}.json",
    log:
        "logs/{profile}/{protocol}/{dataset}/{method}/k{shots}-s{seed}.log",
    wildcard_constraints:
        protocol="cross-dataset|domain-generalisation",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, transfer_images, backbone=4),
        runtime=240,
        gpu=1,
    params:
        method=method_params,
        protocols=section("protocols"),
        device=section("backbone", "device"),
        dtype=section("backbone", "dtype"),
    shell:
        "gram tune --params params.yaml --profile {wildcards.profile} --protocol {wildcards.protocol} --dataset {wildcards.dataset} --method {wildcards.method} --shots {wildcards.shots} --seed {wildcards.seed} --data data/{wildcards.profile} --backbone models/{wildcards.profile}/backbone --out {output} --load-prompt {input.prompt} --log {log}"


rule meta:
    input:
        sources(
            "meta.py",
            "backbone.py",
            "cluster.py",
            "data/__init__.py",
            "data/corpus.py",
            "data/names.py",
            "data/shards.py",
            "distributed.py",
            "embed.py",
            "images.py",
            "io.py",
            "prompts",
            "prototypes.py",
            "regulator.py",
            "tasks.py",
            "tensorio.py",
        ),
        shards="data/{profile}/shards",
        chc="data/{profile}/chc",
        tasks="data/{profile}/tasks",
        prototypes="data/{profile}/prototypes",
        backbone="models/{profile}/backbone",
    output:
        directory("models/{profile}/meta/{recipe}"),
    log:
        "logs/{profile}/meta-{recipe}.log",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(8000, backbone=4, chc=1),
        runtime=1440,
        gpu=1,
    params:
        recipe=meta_params,
        device=section("backbone", "device"),
        dtype=section("backbone", "dtype"),
    shell:
        "gram meta --params params.yaml --profile {wildcards.profile} --recipe {wildcards.recipe} --data data/{wildcards.profile} --chc data/{wildcards.profile}/chc --tasks data/{wildcards.profile}/tasks --prototypes data/{wildcards.profile}/prototypes --backbone models/{wildcards.profile}/backbone --out {output} --log {log}"
