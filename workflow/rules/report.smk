rule report:
    input:
        sources("report.py", "io.py", "tables.py"),
        evals=eval_dirs,
        runs=run_files,
        backbone="models/{profile}/backbone",
        chc="data/{profile}/chc",
        meta=meta_dirs,
    output:
        md="results/{profile}/zero_shot.md",
        csv=report(
            "results/{profile}/zero_shot.csv",
            caption="../report/zero_shot.rst",
            category="Zero-shot",
        ),
        metrics="results/{profile}/zero_shot.json",
        plot=report(
            "results/{profile}/zero_shot.png",
            caption="../report/zero_shot.rst",
            category="Zero-shot",
        ),
        loss=report(
            "results/{profile}/backbone.png",
            caption="../report/backbone.rst",
            category="Backbone",
        ),
        tables=expand("results/{{profile}}/{name}.md", name=PROTOCOL_TABLES),
        few_shot=report(
            "results/{profile}/few_shot.csv",
            caption="../report/few_shot.rst",
            category="Protocols",
            subcategory="Few-shot",
        ),
        base_to_new=report(
            "results/{profile}/base_to_new.csv",
            caption="../report/base_to_new.rst",
            category="Protocols",
            subcategory="Base-to-new",
        ),
        cross_dataset=report(
            "results/{profile}/cross_dataset.csv",
            caption="../report/cross_dataset.rst",
            category="Protocols",
            subcategory="Cross-dataset",
        ),
        domain_generalisation=report(
            "results/{profile}/domain_generalisation.csv",
            caption="../report/domain_generalisation.rst",
            category="Protocols",
            subcategory="Domain generalisation",
        ),
        curves=report(
            "results/{profile}/few_shot.png",
            caption="../report/few_shot.rst",
            category="Protocols",
            subcategory="Few-shot",
        ),
        protocols="results/{profile}/protocols.json",
        runs="results/{profile}/runs.csv",
        clustering_md="results/{profile}/clustering.md",
        clustering_csv=report(
            "results/{profile}/clustering.csv",
            caption="../report/clustering.rst",
            category="Meta-training data",
        ),
        clustering_png=report(
            "results/{profile}/clustering.png",
            caption="../report/clustering.rst",
            category="Meta-training data",
        ),
        meta_md="results/{profile}/meta_training.md",
        meta_png=report(
            "results/{profile}/meta_training.png",
            caption="../report/meta_training.rst",
            category="Meta-training",
        ),
        timings="results/{profile}/timings.csv",
    log:
        "logs/{profile}/report.log",
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000),
        runtime=30,
    params:
        grid=config["grid"],
        evaluate=section("evaluate"),
        vendors=section("data", "vendors"),
        protocols=section("protocols"),
    shell:
        "gram report --params params.yaml --profile {wildcards.profile} --eval results/{wildcards.profile}/eval --runs results/{wildcards.profile}/runs --backbone models/{wildcards.profile}/backbone --chc data/{wildcards.profile}/chc --meta models/{wildcards.profile}/meta --out results/{wildcards.profile} --log {log}"
