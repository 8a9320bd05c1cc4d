"""Snakemake and DVC describe the same pipeline: the same `gram` commands, the same lint-clean files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import PARAMS_FILES, ROOT, load_params_yaml, use_params

PROJECT_FILES = ["Snakefile", "workflow", "dvc.yaml", "gram", "tests/fake_npm.py"]


def copy_project(dest: Path, profile: str, grid: dict | None = None, edit=None) -> Path:
    """A copy of the project's pipeline files at `dest` with `profile`'s params file as its params.yaml,
    `profile:` set and `grid:` replaced by `grid` (or the profile's own grid; conftest.use_params)."""
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    use_params(dest, profile, grid, edit)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path, timeout: int = 1800, env: dict[str, str] | None = None) -> str:
    """`cmd` in `cwd` (with `env` added to the environment); its output, or a failure showing its end."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def snakemake_commands(cwd: Path) -> Counter:
    out = run(["snakemake", "-n", "-p", "--forceall", "--nocolor", "--cores", "1"], cwd)
    return Counter(line.split("Shell command: ", 1)[1].strip() for line in out.splitlines()
                   if "Shell command: " in line and not line.endswith("None"))


def dvc_commands(cwd: Path) -> Counter:
    out = run(["dvc", "repro", "--dry", "--force"], cwd)
    return Counter(line[2:].strip() for line in out.splitlines() if line.startswith("> "))


# the tiny profile in the fast tier; the others (thousands of jobs for paper) with the slow tests
@pytest.mark.parametrize("profile", ["tiny", *(pytest.param(p, marks=pytest.mark.slow)
                                              for p in ("emoji", "paper", "paper_smoke"))])
def test_snakemake_and_dvc_run_the_same_commands(tmp_path, profile):
    cwd = copy_project(tmp_path, profile)
    smk, dvc = snakemake_commands(cwd), dvc_commands(cwd)
    assert smk and smk == dvc
    stages = Counter(c.split()[1] for c in smk)
    g = yaml.safe_load((cwd / "params.yaml").read_text())["grid"]
    tuned = len(g["tuned"]) + len(g["gram"])
    assert g["gram"] and g["meta"], "the default grid runs GRAM methods"
    few_shot = len(g["datasets"]) * tuned * len(g["shots"]) * len(g["seeds"])
    base_to_new = len(g["datasets"]) * tuned * len(g["seeds"])
    transfer = 2 * tuned * len(g["seeds"])
    t = g["tpt"]
    tpt = len(t["datasets"]) * (len(t["words"]) + len(t["tuned"]) + len(t["gram"])) * len(g["seeds"])
    assert tpt, "the default grid runs test-time methods"
    assert stages == {"download": 1, "backbone": 1, "evaluate": len(g["methods"]),
                      "tune": few_shot + base_to_new + transfer, "report": 1, "embed": 1, "cluster": 1,
                      "tasks": 1, "prototypes": 1, "meta": len(g["meta"]), "tpt": tpt, "tpt-report": 1}
    # a test-time job reads the few-shot prompt (same seed) or the meta output its grid entry names
    reads = {m: None for m in t["words"]}
    reads.update({e["method"]: f"--prompt models/{profile}/prompts/{g['transfer']['dataset']}/{e['prompt']}/"
                               f"k{g['transfer']['shots']}-s{{seed}}.safetensors" for e in t["tuned"]})
    reads.update({e["method"]: f"--meta models/{profile}/meta/{e['meta']}" for e in t["gram"]})
    for c in smk:
        m = re.search(r"^gram tpt .*--method (\S+) --seed (\S+)", c)
        if m:
            want = reads[m.group(1)]
            if want is None:
                assert "--prompt" not in c and "--meta" not in c, c
            else:
                assert want.format(seed=m.group(2)) in c, c
    # a GRAM method's tuning reads its recipe's meta-training output; a plain method's does not
    recipe = {e["method"]: e["meta"] for e in g["gram"]}
    for c in smk:
        m = re.search(r"--protocol (few-shot|base-to-new) .*--method (\S+)", c)
        if m:
            want = f"--meta models/{profile}/meta/{recipe[m.group(2)]}" if m.group(2) in recipe else None
            assert (want in c) if want else ("--meta" not in c), c
    protocols = Counter(re.search(r"--protocol (\S+)", c).group(1) for c in smk if c.split()[1] == "tune")
    assert protocols == {"few-shot": few_shot, "base-to-new": base_to_new,
                         "cross-dataset": transfer // 2, "domain-generalisation": transfer // 2}
    assert all(f"--profile {profile}" in c for c in smk)


def test_dvc_params_name_existing_sections():
    """Every `params:` entry of dvc.yaml resolves in params.yaml for every profile."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for profile in ("emoji", "tiny", "paper", "paper_smoke"):
        params = load_params_yaml(PARAMS_FILES[profile])
        for name, st in stages.items():
            for key in st.get("params", []):
                g = params[profile].get("grid") or params["grid"]
                for method, recipe in [(m, r) for m in g["tuned"] for r in g["meta"]] + \
                        [(e["method"], e["meta"]) for e in g["gram"]]:
                    node = params
                    key_ = key.replace("${profile}", profile).replace("${item.method}", method)
                    key_ = key_.replace("${item.entry.method}", method).replace("${item.recipe}", recipe)
                    for part in key_.split("."):
                        assert part in node, f"dvc.yaml stage {name}: params key {key} missing for {profile}"
                        node = node[part]


def test_snakemake_lint_and_format():
    out = run(["snakemake", "--lint", "--cores", "1"], ROOT)
    assert "Congratulations, your workflow is in a good condition!" in out, out
    assert "may not be validated correctly" not in out, out
    run(["snakefmt", "--check", "Snakefile", "workflow/rules"], ROOT)


GPU_RULES = {"backbone", "embed", "cluster", "evaluate", "few_shot", "base_to_new", "transfer", "meta", "tpt"}


@pytest.mark.slow
def test_paper_grid_from_the_command_line(tmp_path):
    """`snakemake -n --config profile=paper` on the committed params.yaml (profile: emoji) lists every job of
    the paper grid, each GPU rule's jobs asking for a GPU and no other job asking for one."""
    cwd = copy_project(tmp_path, "emoji")
    # descriptions as the download stage writes them, with the real split sizes: a job's mem_mb adds
    # twice the uint8 images it decodes at 224 px (the largest test split of any domain, plus its shots)
    inet = {"source": "fewshot", "classes": [f"c{i}" for i in range(1000)],
            "splits": {"default": {"train": 1281167, "test": 50000}, "imagenet_v2": {"test": 10000},
                       "imagenet_sketch": {"test": 50889}, "imagenet_a": {"test": 7500}, "imagenet_r": {"test": 30000}}}
    dtd = {"source": "fewshot", "classes": [f"t{i}" for i in range(47)],
           "splits": {"default": {"train": 2820, "val": 1128, "test": 1692}}}
    (cwd / "data/paper/datasets").mkdir(parents=True)
    for name, doc in (("imagenet", inet), ("dtd", dtd)):
        (cwd / f"data/paper/datasets/{name}.json").write_text(json.dumps(doc))
    out = run(["snakemake", "-n", "--forceall", "--nocolor", "--cores", "1", "--config", "profile=paper"], cwd)
    blocks = re.split(r"(?m)^(?:local)?rule ", out)[1:]
    image_mb = 224 * 224 * 3 / 2**20

    def mem(rule: str, wildcards: str) -> int:
        [b] = [b for b in blocks if b.startswith(rule + ":") and f"wildcards: {wildcards}\n" in b]
        return int(re.search(r"mem_mb=(\d+)", b).group(1))

    assert mem("few_shot", "profile=paper, dataset=imagenet, method=coop, shots=16, seed=1") == \
        int(4000 + 2 * (50889 + 16 * 1000) * image_mb)  # 23,204 MB: ImageNet-Sketch and 16,000 shots
    assert mem("base_to_new", "profile=paper, dataset=dtd, method=coop, shots=16, seed=1") == \
        int(4000 + 2 * (1692 + 16 * 47) * image_mb)
    assert mem("transfer", "profile=paper, protocol=cross-dataset, dataset=imagenet, method=coop, shots=16, seed=1") \
        == int(4000 + 2 * 50889 * image_mb)
    assert mem("evaluate", "profile=paper, method=zeroshot") == int(4000 + 2 * 50889 * image_mb)
    assert mem("tpt", "profile=paper, dataset=dtd, method=tpt, seed=1") == int(8000 + 2 * 1692 * image_mb)
    assert mem("few_shot", "profile=paper, dataset=caltech101, method=coop, shots=16, seed=1") == 4000  # not listed yet
    jobs = Counter(b.split(":", 1)[0] for b in blocks)
    g = yaml.safe_load((cwd / "params.yaml").read_text())["paper"]["grid"]
    n_ds, tuned, seeds = len(g["datasets"]), len(g["tuned"]) + len(g["gram"]), len(g["seeds"])
    t = g["tpt"]
    assert n_ds == 11 and len(g["shots"]) == 5 and seeds == 3
    assert jobs == {"download": 1, "backbone": 1, "embed": 1, "cluster": 1, "tasks": 1, "prototypes": 1,
                    "meta": len(g["meta"]), "evaluate": len(g["methods"]),
                    "few_shot": n_ds * tuned * len(g["shots"]) * seeds, "base_to_new": n_ds * tuned * seeds,
                    "transfer": 2 * tuned * seeds,
                    "tpt": len(t["datasets"]) * (len(t["words"]) + len(t["tuned"]) + len(t["gram"])) * seeds,
                    "report": 1, "tpt_report": 1, "all": 1}
    assert sum(jobs.values()) == 2255
    for b in blocks:
        rule = b.split(":", 1)[0]
        res = re.search(r"(?m)^\s+resources: (.*)$", b)
        if rule != "all":
            assert ("gpu=1" in res.group(1)) == (rule in GPU_RULES), (rule, res.group(1))
        if rule in ("few_shot", "tpt"):
            assert "profile=paper" in b, b


@pytest.mark.slow
def test_opt_in_img2dataset_rule_runs_before_the_download(tmp_path):
    """With data.paper.img2dataset.enabled, Snakemake builds the corpus shards first (rule img2dataset, whose
    output is the summary beside the shard folder), and the download stage waits for it."""
    def enable(raw):
        raw["paper"]["data"]["paper"]["img2dataset"]["enabled"] = True

    cwd = copy_project(tmp_path, "emoji", edit=enable)
    params = cwd / "params.yaml"
    (cwd / "data/paper/corpus").mkdir(parents=True)
    (cwd / "data/paper/corpus/cc3m.tsv").write_text("caption\turl\n")
    out = run(["snakemake", "-n", "-p", "--nocolor", "--cores", "1", "--config", "profile=paper",
               "--", "data/paper/download.json"], cwd)
    assert re.search(r"(?m)^rule img2dataset:", out), out[-3000:]
    assert "output: data/paper/corpus/cc3m.img2dataset.json" in out
    assert "gram img2dataset --params params.yaml --profile paper" in out
    download = re.split(r"(?m)^rule ", out)
    block = next(b for b in download if b.startswith("download:"))
    assert "data/paper/corpus/cc3m.img2dataset.json" in block.split("output:")[0]  # an input of the download
    # not enabled (the default): no such rule
    use_params(cwd, "emoji")
    out = run(["snakemake", "-n", "--nocolor", "--cores", "1", "--config", "profile=paper", "--",
               "data/paper/download.json"], cwd)
    assert not re.search(r"(?m)^rule img2dataset:", out) and "cc3m.img2dataset.json" not in out


def test_dvc_yaml_is_generated_from_the_stage_table():
    """dvc.yaml is `gram dvc`'s rendering of gram/stages.py (regenerate it after a change there or to the
    package's imports: `gram dvc`)."""
    from gram.stages import render_dvc

    assert (ROOT / "dvc.yaml").read_text() == render_dvc(), "dvc.yaml is stale: run `gram dvc`"


def test_every_stage_is_a_rule_reading_the_table():
    """Each stage of the table is the Snakemake rule of the same name, taking its command, inputs, outputs,
    params and log from the table (the rules add threads, resources and conda only)."""
    from gram.stages import STAGES

    text = "\n".join(p.read_text() for p in sorted((ROOT / "workflow" / "rules").glob("*.smk")))
    for st in STAGES:
        block = re.search(rf"(?ms)^rule {st.rule}:\n(.*?)(?=^\S|\Z)", text)
        assert block, f"no rule {st.rule} for stage {st.name}"
        for helper in ("stage_inputs", "stage_outputs", "stage_params", "stage_log", "stage_cmd"):
            assert f'{helper}("{st.rule}"' in block.group(1), f"rule {st.rule} does not use {helper}"


def test_code_deps_follow_function_level_imports(tmp_path, monkeypatch):
    """A stage's code deps are its module's import closure, imports inside functions included, without
    the shared plumbing (gram/config.py, gram/cli.py)."""
    from gram import stages as S

    deps = S.code_deps("gram.report")
    assert "gram/report.py" in deps and "gram/tables.py" in deps  # tables is imported inside a function
    assert "gram/config.py" not in deps and "gram/cli.py" not in deps
    assert set(S.code_deps("gram.tasks")) >= {"gram/tasks.py", "gram/cluster.py", "gram/io.py"}
