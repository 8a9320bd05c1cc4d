"""The conda environments of the workflow (workflow/envs/*.yaml), checked without conda. [ours]

No conda can be installed here and its channels are unreachable, so nothing below creates an
environment. What can be checked statically is checked:

1. each env file is pinned: it parses, uses conda-forge and Python 3.11, installs gram itself from
   the checkout, and pins every runtime dependency of pyproject.toml to the version of
   constraints.txt (which must satisfy pyproject's range);
2. the rules use them: (a) every rule names the env of its kind (cpu.yaml or gpu.yaml) and the file
   exists; (b) that env provides every distribution the rule's `gram <stage>` imports (following
   gram's own imports, function-level ones included) and every external program the stage runs;
   (c) Snakemake itself accepts `--use-conda -n` and lists exactly the two envs, with
   tests/fake_conda.py standing in for `conda`.

2b reads the env a rule should have (by its kind), not the one it names; 2a checks the name.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import fake_conda
from conftest import ROOT
from gram.stages import import_statements, module_file

ENVS = ROOT / "workflow" / "envs"
KINDS = ("cpu", "gpu")
PYTHON = "python=3.11"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# The kind of every rule, hence its env (workflow/envs/<kind>.yaml). A rule is a GPU rule when it
# declares a `gpu` resource (workflow/rules/resources.smk); this table and the declarations are
# cross-checked (test_gpu_resource_marks_the_gpu_rules). A new rule has to be added here. cluster is a GPU rule: its k-means runs on backbone.device (gram/cluster.py), and a
# CPU-only torch would run it on the CPU ("auto") or fail ("cuda").
RULE_KIND = {
    "download": "cpu", "tasks": "cpu", "prototypes": "cpu", "report": "cpu", "tpt_report": "cpu",
    "backbone": "gpu", "embed": "gpu", "cluster": "gpu", "evaluate": "gpu", "few_shot": "gpu",
    "base_to_new": "gpu", "transfer": "gpu", "meta": "gpu", "tpt": "gpu",
}
NO_ENV = {"all"}  # rules without a command, hence without an environment

# External programs: the gram modules that start processes (stage_tools says which commands), and
# the conda package that provides each program.
PROCESS_MODULES = {"gram.data.emoji", "gram.distributed"}
TOOL_PACKAGES = {"npm": "nodejs", "python": "python", "python3": "python"}


# ---------------------------------------------------------------------------------------------
# 1. the env files


def constraints() -> dict[str, Version]:
    """Canonical distribution name -> exact version of constraints.txt."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def runtime_requirements() -> list[Requirement]:
    """`[project].dependencies` of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


@dataclass
class EnvFile:
    """One env file: its conda dependencies and its pip list, split by kind of line."""

    path: Path
    channels: list[str]
    conda: list[str]  # conda match specs, e.g. "python=3.11"
    pins: dict[str, Requirement] = field(default_factory=dict)  # canonical name -> requirement
    editables: list[str] = field(default_factory=list)  # `-e PATH`
    options: list[tuple[str, str]] = field(default_factory=list)  # (`--option`, value)

    def conda_names(self) -> set[str]:
        return {re.split(r"[=<>!~ ]", spec, maxsplit=1)[0] for spec in self.conda}


@cache
def load_env(kind: str) -> EnvFile:
    path = ENVS / f"{kind}.yaml"
    doc = yaml.safe_load(path.read_text())
    deps = doc["dependencies"]
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, f"{path.name}: expected one `pip:` section"
    env = EnvFile(path, doc.get("channels", []), [d for d in deps if isinstance(d, str)])
    for item in pip_sections[0]:
        if item.startswith("-e "):
            env.editables.append(item[3:].strip())
        elif item.startswith("-"):
            opt, _, value = item.partition(" ")
            env.options.append((opt, value.strip()))
        else:
            req = Requirement(item)
            name = canonicalize_name(req.name)
            assert name not in env.pins, f"{path.name}: {req.name} listed twice"
            env.pins[name] = req
    return env


def pinned_version(req: Requirement) -> Version:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return Version(spec.version)


@pytest.mark.parametrize("kind", KINDS)
def test_env_file_parses_and_names_its_channel_and_python(kind):
    env = load_env(kind)
    assert "conda-forge" in env.channels, f"{env.path.name}: channels {env.channels}"
    assert PYTHON in env.conda, f"{env.path.name}: conda dependencies {env.conda} lack {PYTHON}"
    assert "pip" in env.conda_names(), f"{env.path.name}: a `pip:` section needs pip itself"


@pytest.mark.parametrize("kind", KINDS)
def test_env_installs_gram_from_the_checkout(kind):
    """`-e ../..`: conda runs pip from the directory of the env file it reads, which is
    workflow/envs/ by hand and .snakemake/conda/ under Snakemake (a copy): both must reach ROOT."""
    env = load_env(kind)
    assert env.editables == ["../.."], f"{env.path.name}: editable installs {env.editables}"
    for where in (env.path.parent, ROOT / ".snakemake" / "conda"):
        root = (where / env.editables[0]).resolve()
        assert root == ROOT, f"-e {env.editables[0]} from {where} is {root}"
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"] == "gram"


@pytest.mark.parametrize("kind", KINDS)
def test_env_pins_equal_constraints(kind):
    env, pins = load_env(kind), constraints()
    for name, req in env.pins.items():
        assert name in pins, f"{env.path.name}: {req} is not in constraints.txt"
        assert pinned_version(req) == pins[name], f"{env.path.name}: {req}, constraints.txt has {pins[name]}"
        assert not req.marker and not req.extras and not req.url, f"{env.path.name}: {req} is not a bare pin"


@pytest.mark.parametrize("kind", KINDS)
def test_env_pins_every_runtime_dependency_within_pyproject_range(kind):
    env = load_env(kind)
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in env.pins, f"{env.path.name}: runtime dependency {req.name} is not pinned"
        version = pinned_version(env.pins[name])
        assert req.specifier.contains(version, prereleases=True), \
            f"{env.path.name}: {req.name}=={version} is outside pyproject's {req}"


def test_constraints_satisfy_pyproject():
    """The pins of constraints.txt themselves fall inside pyproject's ranges (extras included)."""
    pins = constraints()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for req in map(Requirement, reqs):
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} vs {req}"


def test_pip_index_options():
    """The CPU env adds PyTorch's CPU wheel index (so torch==X resolves to X+cpu); the GPU env
    keeps PyPI's CUDA build. Neither replaces PyPI (`--index-url`), which serves every other pin."""
    assert load_env("cpu").options == [("--extra-index-url", CPU_INDEX)]
    assert load_env("gpu").options == []
    assert "torch" in load_env("cpu").pins and "torch" in load_env("gpu").pins


# ---------------------------------------------------------------------------------------------
# 2a. every rule names the env of its kind


@dataclass
class Rule:
    name: str
    file: Path  # the Snakefile or .smk that defines it (relative paths resolve against its directory)
    directives: dict[str, str]  # directive -> its raw value text

    def literal(self, key: str):
        """The directive's value as a Python literal (implicitly concatenated strings included)."""
        return ast.literal_eval("(" + self.directives[key] + "\n)")

    def resources(self) -> set[str]:
        text = self.directives.get("resources", "")
        return set(re.findall(r"(?:^|,)\s*(\w+)\s*=", text, flags=re.M))

    def stage(self) -> str | None:
        """The `gram <stage>` this rule runs, or None for a rule without a shell command."""
        if "shell" not in self.directives:
            return None
        table = re.fullmatch(r'\s*stage_cmd\("([\w-]+)"\)\s*', self.directives["shell"])
        if table:  # the command of gram/stages.py's table
            from gram.stages import stage

            command = stage(table.group(1)).cmd
        else:
            command = self.literal("shell")
        m = re.match(r"\s*gram\s+(\S+)", command)
        assert m, f"rule {self.name}: shell command does not start with `gram <stage>`"
        return m.group(1)


@cache
def workflow_rules() -> dict[str, Rule]:
    """The rules of the Snakefile and workflow/rules/*.smk, read from their (snakefmt-formatted)
    text: `rule NAME:` at column 0, directives indented by 4, their values inline or indented more."""
    rules: dict[str, Rule] = {}
    for path in [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]:
        rule = key = None
        for line in path.read_text().splitlines():
            head = re.match(r"(?:rule|checkpoint)\s+(\w+)\s*:", line)
            if head:
                assert head.group(1) not in rules, f"rule {head.group(1)} defined twice"
                rule = rules[head.group(1)] = Rule(head.group(1), path, {})
                key = None
            elif line.strip() and not line[0].isspace():  # back at top level
                rule = key = None
            elif rule is not None and (d := re.match(r" {4}(\w+):\s*(.*)$", line)):
                key = d.group(1)
                rule.directives[key] = d.group(2)
            elif rule is not None and key is not None and line.strip():
                rule.directives[key] += "\n" + line.strip()
    return rules


def gpu_rules() -> set[str]:
    """Rules that declare a `gpu` resource; the table's GPU rules while none declares one."""
    declared = {name for name, r in workflow_rules().items() if "gpu" in r.resources()}
    return declared or {name for name, kind in RULE_KIND.items() if kind == "gpu"}


def expected_env(rule: str) -> Path:
    return ENVS / ("gpu.yaml" if rule in gpu_rules() else "cpu.yaml")


def test_every_rule_has_a_kind():
    rules = set(workflow_rules())
    assert rules - NO_ENV == set(RULE_KIND), \
        f"new rules {sorted(rules - NO_ENV - set(RULE_KIND))} / gone {sorted(set(RULE_KIND) - rules)}"
    for name in NO_ENV & rules:
        assert "shell" not in workflow_rules()[name].directives, f"rule {name} runs a command"


@pytest.mark.parametrize("rule", sorted(RULE_KIND))
def test_rule_names_the_env_of_its_kind(rule):
    r = workflow_rules()[rule]
    assert "conda" in r.directives, f"rule {rule} ({r.file.name}) has no conda: directive"
    value = r.literal("conda")
    assert isinstance(value, str), f"rule {rule}: conda: {r.directives['conda']!r} is not a literal path"
    path = (r.file.parent / value).resolve()
    assert path.is_file(), f"rule {rule}: conda: {value!r} does not exist ({path})"
    want = expected_env(rule)
    assert path == want, f"rule {rule}: conda: {value!r}, want {os.path.relpath(want, r.file.parent)!r}"


def test_gpu_resource_marks_the_gpu_rules():
    declared = {name for name, r in workflow_rules().items() if "gpu" in r.resources()}
    assert declared == {name for name, kind in RULE_KIND.items() if kind == "gpu"}


# ---------------------------------------------------------------------------------------------
# 2b. every rule's env provides what its stage imports and runs


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name `path` imports anywhere (functions included); for `from X import a`, both
    X and X.a (the latter may be a module). Relative imports are made absolute."""
    names = set()
    for base, imported in import_statements(path, module):
        names.add(base)
        names.update(f"{base}.{a}" for a in imported if a != "*")
    return names - {"", "__future__"}


def import_closure(roots: list[str]) -> tuple[set[str], set[str]]:
    """(gram modules reached from `roots`, top-level names of the other modules they import).
    Importing gram.a.b runs gram/__init__.py and gram/a/__init__.py too."""
    seen, external, todo = set(), set(), list(roots)
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if top != "gram":
            external.add(top)
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            path = module_file(mod)
            if mod in seen or path is None:  # X.a that is a name in X, not a module
                continue
            seen.add(mod)
            todo.extend(imported_names(path, mod))
    return seen, external - set(sys.stdlib_module_names)


def distributions(top_names: set[str], where: str) -> set[str]:
    """Canonical names of the distributions that provide the top-level import names."""
    provided = packages_distributions()
    out = set()
    for top in sorted(top_names):
        assert top in provided, f"{where} imports {top!r}, which no installed distribution provides"
        out.update(canonicalize_name(d) for d in provided[top])
    return out


def stage_module(stage: str) -> str:
    from gram.cli import STAGES

    assert stage in STAGES, f"`gram {stage}` is not a stage of gram/cli.py"
    return STAGES[stage][0].partition(":")[0]


@cache
def stage_tools(stage: str) -> list[list[str]]:
    """The external commands a stage runs, over every profile (params.yaml and tests/params/): download runs
    data.npm.command (gram/data/emoji.py); meta restarts itself under torchrun on several GPUs
    (gram/distributed.py runs the env's own `python -m torch.distributed.run`)."""
    import gram.config as C

    if stage == "meta":
        return [["python", "-m", "torch.distributed.run"]]
    if stage != "download":
        return []
    out = []
    from conftest import PARAMS_FILES

    for profile in C.PROFILES:
        _, prof = C.load(PARAMS_FILES[profile], profile)
        if prof.data.source == "npm":
            out.append(list(prof.data.npm.command))
    return out


def test_only_known_modules_start_processes():
    """Keeps stage_tools honest: a new module that runs external programs must be added there."""
    pattern = re.compile(r"\bsubprocess\b|\bos\.(system|popen|exec\w*|spawn\w*)\b|shutil\.which\b")
    found = set()
    for path in (ROOT / "gram").rglob("*.py"):
        if pattern.search(path.read_text()):
            found.add(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
    assert found == PROCESS_MODULES


@pytest.mark.parametrize("rule", sorted(RULE_KIND))
def test_rule_env_provides_its_imports(rule):
    r = workflow_rules()[rule]
    stage = r.stage()
    assert stage, f"rule {rule} runs no `gram <stage>`"
    modules, external = import_closure(["gram.cli", stage_module(stage)])
    env = load_env(expected_env(rule).stem)
    needed = distributions(external, f"`gram {stage}` (via {sorted(modules)})")
    missing = needed - set(env.pins)
    assert not missing, f"rule {rule} (`gram {stage}`) imports {sorted(missing)}, not pinned in {env.path.name}"


@pytest.mark.parametrize("rule", sorted(RULE_KIND))
def test_rule_env_provides_its_tools(rule):
    stage = workflow_rules()[rule].stage()
    env = load_env(expected_env(rule).stem)
    for command in stage_tools(stage):
        exe = Path(command[0]).name
        assert exe in TOOL_PACKAGES, f"`gram {stage}` runs {exe!r}: add its conda package to TOOL_PACKAGES"
        assert TOOL_PACKAGES[exe] in env.conda_names(), \
            f"rule {rule} runs {exe!r}, whose package {TOOL_PACKAGES[exe]!r} is not in {env.path.name}"
        if TOOL_PACKAGES[exe] != "python" or len(command) < 2:
            continue
        if command[1] == "-m":  # python -m torch.distributed.run: the module's distribution
            needed = distributions({command[2].split(".")[0]}, " ".join(command))
        else:  # python tests/fake_npm.py (the tiny profile): what the script imports
            needed = distributions(import_closure_of_script(ROOT / command[1]), command[1])
        assert needed <= set(env.pins), f"`{' '.join(command)}` needs {sorted(needed - set(env.pins))}"


def import_closure_of_script(script: Path) -> set[str]:
    """Top-level third-party names a standalone script imports (gram's through its closure)."""
    names = imported_names(script, script.stem)
    gram_names = sorted(n for n in names if n.split(".")[0] == "gram")
    _, external = import_closure(gram_names)
    local = {p.stem for p in script.parent.glob("*.py")}  # siblings on the script's sys.path
    tops = {n.split(".")[0] for n in names} - {"gram"} - local - set(sys.stdlib_module_names)
    return tops | external


# ---------------------------------------------------------------------------------------------
# 2c. Snakemake accepts the envs (with a stand-in for conda)


@pytest.fixture(scope="module")
def conda_project(tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the workflow's files and a PATH that starts with the fake conda."""
    base = tmp_path_factory.mktemp("conda")
    fake_conda.install(base / "bin")
    project = base / "project"
    for name in ("Snakefile", "params.yaml", "workflow", "gram"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            project.mkdir(exist_ok=True)
            shutil.copy2(src, project / name)
    env = {**os.environ, "PATH": f"{base / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return project, env


def snakemake(args: list[str], project: Path, env: dict) -> str:
    cmd = ["snakemake", "--use-conda", "--forceall", "--cores", "1", "--nocolor", *args]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-3000:]}"
    return out


def test_fake_conda_answers_what_snakemake_asks(conda_project):
    _, env = conda_project
    conda = shutil.which("conda", path=env["PATH"])
    ok = subprocess.run([conda, "info", "--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and '"platform"' in ok.stdout
    no = subprocess.run([conda, "env", "create", "-f", "x.yaml"], capture_output=True, text=True, env=env)
    assert no.returncode == 1 and "not answered" in no.stderr


def test_snakemake_dry_run_with_conda_uses_both_envs(conda_project):
    project, env = conda_project
    out = snakemake(["-n", "--quiet"], project, env)
    created = set(re.findall(r"Conda environment (\S+) will be created", out))
    assert created == {"workflow/envs/cpu.yaml", "workflow/envs/gpu.yaml"}, out[-2000:]


def test_snakemake_lists_both_envs(conda_project):
    project, env = conda_project
    out = snakemake(["--list-conda-envs"], project, env)  # a table: environment, container, location
    listed = {line.split("\t")[0] for line in out.splitlines() if line.split("\t")[0].endswith(".yaml")}
    assert listed == {"workflow/envs/cpu.yaml", "workflow/envs/gpu.yaml"}, out[-2000:]
