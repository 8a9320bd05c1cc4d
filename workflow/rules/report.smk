rule report:
    input:
        sources("report.py", "tables.py", "io.py"),
        evals=eval_dirs,
        runs=run_files,
        backbone="models/{profile}/backbone",
        chc="data/{profile}/chc",
        meta=meta_dirs,
    output:
        md="results/{profile}/zero_shot.md",
        csv="results/{profile}/zero_shot.csv",
        metrics="results/{profile}/zero_shot.json",
        plot="results/{profile}/zero_shot.png",
        loss="results/{profile}/backbone.png",
        tables=expand(
            "results/{{profile}}/{name}.{ext}", name=PROTOCOL_TABLES, ext=["md", "csv"]
        ),
        curves="results/{profile}/few_shot.png",
        protocols="results/{profile}/protocols.json",
        runs="results/{profile}/runs.csv",
        clustering=multiext("results/{profile}/clustering", ".md", ".csv", ".png"),
        meta=multiext("results/{profile}/meta_training", ".md", ".png"),
    log:
        "logs/{profile}/report.log",
    conda:
        "../envs/gram.yaml"
    params:
        grid=config["grid"],
        evaluate=section("evaluate"),
        vendors=section("data", "vendors"),
        protocols=section("protocols"),
    shell:
        "gram report --params params.yaml --profile {wildcards.profile} --eval results/{wildcards.profile}/eval --runs results/{wildcards.profile}/runs --backbone models/{wildcards.profile}/backbone --chc data/{wildcards.profile}/chc --meta models/{wildcards.profile}/meta --out results/{wildcards.profile} --log {log}"
