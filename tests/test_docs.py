"""
The documentation's commands, checked without running them.

Every shell command of README.md and docs/*.md (the lines of fenced ```bash / ```sh / ``` blocks,
lines that start with `python ` or `bash `, and inline code that starts so) that runs a script of
this repository is checked: the script exists (tools/*.py, demo/demo.py, tools/install.sh,
.ci/run, ...), every `--flag` it passes is an option of that script, every config file it names
exists, and with a `--config-file` of configs/ the config merges with the command's overrides
(YAML: Detectron2's get_cfg + vfnet.add_vfnet_config + merge_from_file + merge_from_list of the
KEY VALUE pairs; LazyConfig .py: LazyConfig.load + apply_overrides of the key=value pairs).

A tool's options are read from its source with `ast` (the strings of its `add_argument(...)`
calls, and of the dev/ modules it takes its `main` or parser from), plus, where it builds its
parser with vfnet.engine's `default_argument_parser` (or runs `launch_main`), that parser's
options: no module of tools/ is imported. tools/install.sh's options are its `case` arms.
Placeholders (CONFIG, IN.pth, paths a user supplies) are fine: only what the repository itself
provides (configs/, tools/, demo/, dev/, .ci/) is checked. Values written as shell variables
(`$s`) or `...` are placeholders: their key must exist, the value is not merged.

A `vfnet://NAME` address must name official weights that download (vfnet.checkpoint.catalog),
those of the configs/mmdet/ config of the command when it has one; and every `model_zoo` call of
the docs' Python names a config of configs/ (with official weights where it asks for them).

The links between the docs are checked too: every relative link resolves to a file of the
checkout, and an anchor to a heading of its page.
"""
import argparse
import ast
import functools
import os
import re
import shlex
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
REQUIRED_DOCS = [
    "INSTALL.md",
    "GETTING_STARTED.md",
    "MODEL_ZOO.md",
    "BENCHMARKS.md",
    "RESULTS.md",
    "TROUBLESHOOTING.md",
    "ARCHITECTURE.md",
]

SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PREFIX_WORDS = {"time", "do", "then", "else", "exec", "nohup", "env"}
COMMAND_SEPARATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}
# A YAML config key on the command line: upper-case and dotted (MODEL.WEIGHTS), or a top-level
# key of Detectron2's config (SEED, OUTPUT_DIR).
YAML_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")
LAZY_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)*=")
# The folders whose files the repository provides: a path into them must exist.
REPO_DIRS = ("configs/", "tools/", "demo/", "dev/", ".ci/")
CONFIG_FILE = re.compile(r"(^|/)configs/\S+\.(yaml|yml|py)$")
REMAINDER = "A..."


class Command(NamedTuple):
    source: str  # "docs/X.md:LINE"
    text: str


# ---------------------------------------------------------------------------------------------
# Extraction


def _starts_like_a_command(text: str, scripts: bool = False) -> bool:
    """Whether `text` runs python or bash (with `scripts`, also a script of the repository run
    directly, such as .ci/run)."""
    words = text.split()
    while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in PREFIX_WORDS):
        words = words[1:]
    if not words:
        return False
    first = words[0]
    return _is_python(first) or first in ("bash", "sh") or (scripts and _repo_path(first) is not None)


def extract_commands(text: str, name: str) -> List[Command]:
    """The shell commands of a Markdown text: the logical lines (backslash continuations joined)
    of its shell code blocks, the prose lines that start with `python ` / `bash `, and the inline
    code spans that start so."""
    lines = text.splitlines()
    commands: List[Command] = []
    prose = []  # the text outside code blocks, line for line (code blocks blanked)
    fence: Optional[str] = None
    lang = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang = m.group(1), m.group(2).lower()
            prose.append("")
            i += 1
            continue
        if fence is not None:
            if line.strip().startswith(fence[0] * 3) and not line.strip().strip(fence[0]):
                fence = None
                prose.append("")
                i += 1
                continue
            start = i
            logical = line
            while logical.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                prose.append("")
                logical = logical.rstrip()[:-1].rstrip() + " " + lines[i].strip()
            prose.append("")
            # A line of a shell block that runs python, bash or a script of the repository (not
            # wget, a variable's assignment, or the text of a plain ``` block).
            if lang in SHELL_LANGS and _starts_like_a_command(logical.strip(), scripts=True):
                commands.append(Command(f"{name}:{start + 1}", logical.strip()))
            i += 1
            continue
        stripped = line.strip()
        if stripped.startswith(("python ", "python3 ", "bash ")):
            start = i
            logical = stripped
            while logical.endswith("\\") and i + 1 < len(lines):
                i += 1
                logical = logical[:-1].rstrip() + " " + lines[i].strip()
            commands.append(Command(f"{name}:{start + 1}", logical))
            prose.extend([""] * (i - start + 1))
            i += 1
            continue
        prose.append(line)
        i += 1
    joined = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", joined):
        span = m.group(1)
        if re.search(r"\n\s*\n", span):
            continue
        span = " ".join(span.split())
        if _starts_like_a_command(span):
            line_no = joined.count("\n", 0, m.start()) + 1
            commands.append(Command(f"{name}:{line_no}", span))
    return commands


def all_commands() -> List[Command]:
    out = []
    for path in DOCS:
        out += extract_commands(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return out


def split_simple_commands(text: str) -> List[List[str]]:
    """The simple commands of a shell line (split at &&, ||, ;, |), each as words; comments
    dropped, the usage notation [--opt VALUE] unwrapped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError as e:  # an unclosed quote
        raise CommandError(f"cannot be parsed as a shell command: {e}")
    commands, current = [], []
    for tok in tokens:
        if tok in COMMAND_SEPARATORS or set(tok) <= set(";&|()<>"):
            if current:
                commands.append(current)
            current = []
            continue
        current.append(_unwrap_usage_brackets(tok))
    if current:
        commands.append(current)
    return [c for c in commands if c]


def _unwrap_usage_brackets(tok: str) -> str:
    # "[--amp]", "[--iters", "5]": the optional-argument notation of a usage line; a value such
    # as "[1.0, 1.0, 1.0]" (one quoted word) holds both brackets and is kept.
    if tok.startswith("[") and "]" not in tok[1:]:
        tok = tok[1:]
    elif tok.startswith("[-") and tok.endswith("]"):
        tok = tok[1:-1]
    if tok.endswith("]") and "[" not in tok:
        tok = tok[:-1]
    return tok


def _is_python(word: str) -> bool:
    base = os.path.basename(word)
    return re.fullmatch(r"python(3(\.\d+)?)?", base) is not None


# ---------------------------------------------------------------------------------------------
# The scripts' options


class CommandError(Exception):
    pass


class Spec(NamedTuple):
    options: Dict[str, object]  # option string -> nargs (0, 1, int, "?", "*", "+", REMAINDER)
    choices: Dict[str, Tuple[str, ...]]  # option string -> its literal choices
    positionals: List[Tuple[str, object]]  # (dest, nargs) in order
    takes_positionals: bool  # a bash script: whether it accepts positional words


def _nargs_of(call: ast.Call) -> object:
    kw = {k.arg: k.value for k in call.keywords if k.arg}
    action = kw.get("action")
    if isinstance(action, ast.Constant) and action.value in (
        "store_true", "store_false", "count", "store_const", "append_const", "help", "version"
    ):
        return 0
    nargs = kw.get("nargs")
    if nargs is None:
        return None
    if isinstance(nargs, ast.Constant):
        return nargs.value
    if isinstance(nargs, ast.Attribute) and nargs.attr == "REMAINDER":
        return REMAINDER
    return "*"


def _module_env(tree: ast.Module) -> Dict[str, object]:
    """The names a script's choices may refer to: what it imports from vfnet (the product) and
    dev/ (the lab), and its own module-level literals and dicts with literal keys."""
    import importlib

    env: Dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("vfnet", "dev"):
            for alias in node.names:
                try:
                    module = importlib.import_module(node.module)
                    value = getattr(module, alias.name, None)
                    if value is None:
                        value = importlib.import_module(f"{node.module}.{alias.name}")
                except Exception:  # noqa: BLE001 - a name that does not resolve checks nothing
                    continue
                env[alias.asname or alias.name] = value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Dict) and all(isinstance(k, ast.Constant) for k in value.keys):
                env[node.targets[0].id] = {k.value: None for k in value.keys}
            else:
                try:
                    env[node.targets[0].id] = ast.literal_eval(value)
                except (ValueError, SyntaxError, TypeError):
                    pass
    return env


def _choices(call: ast.Call, env_of) -> Optional[Tuple[str, ...]]:
    for k in call.keywords:
        if k.arg == "choices":
            try:
                value = ast.literal_eval(k.value)
            except (ValueError, SyntaxError, TypeError):
                builtins = {"sorted": sorted, "list": list, "tuple": tuple, "set": set}
                try:
                    code = compile(ast.Expression(k.value), "<choices>", "eval")
                    value = eval(code, {"__builtins__": builtins}, env_of())  # noqa: S307
                except Exception:  # noqa: BLE001 - choices that do not resolve are not checked
                    return None
            return tuple(str(v) for v in value)
    return None


def _dev_modules(tree: ast.AST) -> List[Path]:
    """The dev/ modules a tool imports from (its main or its parser may be theirs)."""
    paths = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dev":
            path = ROOT / (node.module.replace(".", "/") + ".py")
            if path.is_file():
                paths.append(path)
    return paths


def _uses_vfnet_parser(tree: ast.AST) -> bool:
    names = {"default_argument_parser", "launch_main"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vfnet"):
            if any(a.name in names for a in node.names):
                return True
        if isinstance(node, ast.Attribute) and node.attr in names:
            return True
    return False


@functools.lru_cache(maxsize=None)
def vfnet_parser_spec() -> Spec:
    """The options of vfnet.engine.default_argument_parser (the product: imported)."""
    pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
    from vfnet.engine import default_argument_parser

    parser = default_argument_parser()
    options, choices, positionals = {}, {}, []
    for action in parser._actions:
        nargs = action.nargs
        if nargs == argparse.REMAINDER:
            nargs = REMAINDER
        if action.option_strings:
            for opt in action.option_strings:
                options[opt] = nargs
                if action.choices:
                    choices[opt] = tuple(str(c) for c in action.choices)
        else:
            positionals.append((action.dest, nargs))
    return Spec(options, choices, positionals, True)


@functools.lru_cache(maxsize=None)
def python_script_spec(path: Path) -> Spec:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    trees = [tree] + [ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in _dev_modules(tree)]
    options: Dict[str, object] = {"-h": 0, "--help": 0}
    choices: Dict[str, Tuple[str, ...]] = {}
    positionals: List[Tuple[str, object]] = []
    for t in trees:
        env_of = functools.lru_cache(maxsize=None)(functools.partial(_module_env, t))
        for node in ast.walk(t):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr != "add_argument":
                continue
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if not names:
                continue
            nargs = _nargs_of(node)
            if names[0].startswith("-"):
                for n in names:
                    options[n] = nargs
                    lit = _choices(node, env_of)
                    if lit is not None:
                        choices[n] = lit
            else:
                positionals.append((names[0], nargs))
    if _uses_vfnet_parser(tree):
        base = vfnet_parser_spec()
        options = {**base.options, **options}
        choices = {**base.choices, **choices}
        positionals = base.positionals + positionals
    return Spec(options, choices, positionals, True)


@functools.lru_cache(maxsize=None)
def bash_script_spec(path: Path) -> Spec:
    """The options of a bash script: the arms (`--flag)`, `--flag=*)`, `-h|--help)`) of the
    `case "$1" in` of its argument loop (`while ...; do`); an arm that shifts 2 takes a value. A
    catch-all arm `*)` that does not stop the script lets it take positional words; without an
    argument loop it takes no argument at all."""
    options: Dict[str, object] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    takes_positionals = False
    for i, line in enumerate(lines):
        if not (re.match(r'^\s*case "?\$1"? in', line) and i and re.search(r"\bwhile\b", lines[i - 1])):
            continue
        for j in range(i + 1, len(lines)):
            arm_line = lines[j]
            if re.match(r"^\s*esac\b", arm_line):
                break
            arm = " ".join(lines[j:j + 3]).split(";;")[0]
            m = re.match(r"^\s*((?:-[\w-]+(?:=\*)?)(?:\|-[\w-]+(?:=\*)?)*)\)", arm_line)
            if m:
                for pattern in m.group(1).split("|"):
                    if pattern.endswith("=*"):
                        options.setdefault(pattern[:-2], 1)
                    else:
                        options[pattern] = 1 if "shift 2" in arm else 0
            elif re.match(r"^\s*\*\)", arm_line) and not re.search(r"\bdie\b|\bexit [1-9]", arm):
                takes_positionals = True
    return Spec(options, {}, [], takes_positionals)


# ---------------------------------------------------------------------------------------------
# The check of one command


class Parsed(NamedTuple):
    script: str  # relative to ROOT
    options: Dict[str, List[str]]  # option -> its values (the last use)
    positionals: List[str]


def _takes(nargs, words: List[str], j: int) -> int:
    """How many of words[j:] an option of `nargs` takes, as argparse does."""
    rest = words[j:]
    if nargs == 0:
        return 0
    if nargs is None:
        return 1 if rest else 0
    if isinstance(nargs, int):
        return min(nargs, len(rest))
    if nargs == REMAINDER:
        return len(rest)
    n = 0
    for w in rest:
        if w.startswith("-") and not re.fullmatch(r"-\d+(\.\d*)?", w):
            break
        n += 1
        if nargs == "?":
            break
    return n


def parse_invocation(words: List[str], script: str, spec: Spec, errors: List[str]) -> Parsed:
    options: Dict[str, List[str]] = {}
    positionals: List[str] = []
    j = 0
    while j < len(words):
        w = words[j]
        if w == "--":
            positionals += words[j + 1:]
            break
        if w.startswith("-") and len(w) > 1 and not re.fullmatch(r"-\d+(\.\d*)?", w):
            flag, eq, value = w.partition("=")
            if flag not in spec.options:
                known = ", ".join(sorted(o for o in spec.options if o.startswith("--")))
                errors.append(f"{script}: {flag} is not an option of {script} (its options: {known})")
                j += 1
                continue
            nargs = spec.options[flag]
            if eq:
                values = [value]
                j += 1
            else:
                n = _takes(nargs, words, j + 1)
                values = words[j + 1:j + 1 + n]
                j += 1 + n
            if flag in spec.choices:
                for v in values:
                    if v not in spec.choices[flag] and not _is_placeholder(v):
                        errors.append(f"{script}: {flag} {v}: not one of its choices {list(spec.choices[flag])}")
            options[flag] = values
            if nargs == REMAINDER:
                break
            continue
        positionals.append(w)
        j += 1
        # A positional of nargs REMAINDER (Detectron2's `opts`) takes every later word, options
        # included, as argparse does.
        if len(positionals) <= len(spec.positionals) and spec.positionals[len(positionals) - 1][1] == REMAINDER:
            positionals += words[j:]
            break
    if not spec.takes_positionals and positionals:
        errors.append(f"{script}: takes no positional argument, got {positionals}")
    return Parsed(script, options, positionals)


def _assign_positionals(spec: Spec, words: List[str]) -> Dict[str, List[str]]:
    """The words of each positional argument (what is left over under "__extra__")."""
    out: Dict[str, List[str]] = {}
    j = 0
    for k, (dest, nargs) in enumerate(spec.positionals):
        later = sum(1 if n is None else n for _, n in spec.positionals[k + 1:] if n is None or isinstance(n, int))
        if nargs is None:
            take = 1
        elif isinstance(nargs, int):
            take = nargs
        elif nargs == "?":
            take = min(1, max(0, len(words) - j - later))
        else:  # "*", "+", REMAINDER
            take = max(0, len(words) - j - later)
        out[dest] = words[j:j + take]
        j += take
    out["__extra__"] = words[j:]
    return out


def _is_placeholder(value: str) -> bool:
    return "$" in value or value in ("...", "…")


def config_overrides(parsed: Parsed, spec: Spec, errors: List[str]) -> List[str]:
    """The config overrides of a command: --opts's values (demo/demo.py), else the positional
    `opts` (tools/train_net.py, export_model.py, convert_mmdet_to_d2.py)."""
    if "--opts" in parsed.options:
        return list(parsed.options["--opts"])
    assigned = _assign_positionals(spec, parsed.positionals)
    extra = assigned.pop("__extra__")
    if extra:
        errors.append(f"{parsed.script}: unexpected arguments {extra}")
    return list(assigned.get("opts", []))


@functools.lru_cache(maxsize=None)
def _detectron2_config():
    pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
    from detectron2.config import LazyConfig, get_cfg

    import vfnet

    return get_cfg, LazyConfig, vfnet.add_vfnet_config


def merge_yaml(path: Path, overrides: List[str], errors: List[str], where: str) -> None:
    import logging

    get_cfg, _, add_vfnet_config = _detectron2_config()
    if len(overrides) % 2:
        errors.append(f"{where}: the overrides {overrides} are not KEY VALUE pairs")
        return
    cfg = get_cfg()
    add_vfnet_config(cfg)
    logging.getLogger("fvcore.common.config").setLevel(logging.ERROR)
    try:
        cfg.merge_from_file(str(path))
    except Exception as e:  # noqa: BLE001 - reported, with the config
        errors.append(f"{where}: {path.relative_to(ROOT)} does not merge: {type(e).__name__}: {e}")
        return
    pairs = []
    for key, value in zip(overrides[::2], overrides[1::2]):
        if not YAML_KEY.match(key):
            errors.append(f"{where}: {key!r} (before {value!r}) is not a config key")
            continue
        node = cfg
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                errors.append(f"{where}: config key {key} does not exist (in {path.relative_to(ROOT)})")
                node = None
                break
            node = node[part]
        if node is None:
            continue
        if not _is_placeholder(value):
            pairs += [key, value]
    try:
        cfg.merge_from_list(pairs)
    except Exception as e:  # noqa: BLE001
        errors.append(f"{where}: the overrides {pairs} do not merge into {path.relative_to(ROOT)}: {type(e).__name__}: {e}")


@functools.lru_cache(maxsize=None)
def _official_weights() -> Dict[str, str]:
    """The names of vfnet:// addresses: ModelCatalog's download addresses."""
    pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
    from vfnet.checkpoint.catalog import ModelCatalog

    return dict(ModelCatalog.URLS)


def check_vfnet_address(word: str, config: Optional[str], errors: List[str], where: str) -> None:
    """A vfnet://NAME of a command: official weights that download, those of `config` (a config
    of configs/mmdet/) when it names one."""
    name = word[len("vfnet://"):]
    if _is_placeholder(name):
        return
    if name not in _official_weights():
        errors.append(f"{where}: {word}: no official weights to download of that name")
    elif config and "/mmdet/" in f"/{config}" and not name.startswith("ImageNetPretrained/"):
        if Path(config).stem != name:
            errors.append(f"{where}: {word} are not the weights of {config}")


def merge_lazy(path: Path, overrides: List[str], errors: List[str], where: str) -> None:
    from omegaconf import OmegaConf

    _, LazyConfig, _ = _detectron2_config()
    try:
        cfg = LazyConfig.load(str(path))
    except Exception as e:  # noqa: BLE001
        errors.append(f"{where}: {path.relative_to(ROOT)} does not load: {type(e).__name__}: {e}")
        return
    missing = object()
    applied = []
    for ov in overrides:
        if not LAZY_OVERRIDE.match(ov):
            errors.append(f"{where}: {ov!r} is not a key=value override")
            continue
        key, _, value = ov.partition("=")
        if OmegaConf.select(cfg, key, default=missing) is missing:
            errors.append(f"{where}: {path.relative_to(ROOT)} has no key {key}")
            continue
        if not _is_placeholder(value):
            applied.append(ov)
    try:
        LazyConfig.apply_overrides(cfg, applied)
    except Exception as e:  # noqa: BLE001
        errors.append(f"{where}: the overrides {applied} do not apply to {path.relative_to(ROOT)}: {type(e).__name__}: {e}")


def _repo_path(word: str) -> Optional[str]:
    """`word` as a path the repository provides (configs/..., tools/...), or None."""
    w = word[2:] if word.startswith("./") else word
    return w if w.startswith(REPO_DIRS) else None


def check_command(text: str, where: str = "command") -> List[str]:
    """The problems of one shell line (empty when it is right)."""
    errors: List[str] = []
    try:
        simple = split_simple_commands(text)
    except CommandError as e:
        return [f"{where}: {e}"]
    for words in simple:
        while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in PREFIX_WORDS):
            words = words[1:]
        if not words:
            continue
        first = words[0]
        if _is_python(first):
            args = words[1:]
            while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):
                args = args[1:]
            if not args or args[0] in ("-m", "-c"):
                continue  # a module (python -m pytest ...) or code: no script of the repository
            script, rest, kind = args[0], args[1:], "python"
        elif first in ("bash", "sh"):
            args = [a for a in words[1:]]
            while args and args[0].startswith("-"):
                if args[0] == "-c":
                    args = []
                    break
                args = args[1:]
            if not args:
                continue
            script, rest, kind = args[0], args[1:], "bash"
        elif _repo_path(first) is not None:
            script, rest, kind = first, words[1:], "bash" if not first.endswith(".py") else "python"
        else:
            continue  # wget, source, ...: not a script of the repository
        rel = script[2:] if script.startswith("./") else script
        path = ROOT / rel
        if not path.is_file():
            errors.append(f"{where}: {script} does not exist in the repository")
            continue
        if kind == "python" or rel.endswith(".py"):
            spec = python_script_spec(path)
        else:
            spec = bash_script_spec(path)
        parsed = parse_invocation(rest, rel, spec, errors)
        # Files of the repository that the command names.
        for w in rest:
            for piece in re.split(r"[=:]", w):
                rp = _repo_path(piece)
                if rp and re.search(r"\.(yaml|yml|py|sh)$", rp) and not (ROOT / rp).is_file():
                    errors.append(f"{where}: {rp} does not exist in the repository")
        config = (parsed.options.get("--config-file") or [None])[0]
        for w in rest:
            if w.startswith("vfnet://"):
                check_vfnet_address(w, config, errors, where)
        if not rel.endswith(".py") or config is None:
            continue
        config_rel = _repo_path(config)
        if config_rel is None or not CONFIG_FILE.search(config_rel):
            continue  # a placeholder (CONFIG) or the user's own file
        config_path = ROOT / config_rel
        if not config_path.is_file():
            continue  # reported above
        overrides = config_overrides(parsed, spec, errors)
        if config_path.suffix == ".py":
            merge_lazy(config_path, overrides, errors, where)
        else:
            merge_yaml(config_path, overrides, errors, where)
    return errors


# ---------------------------------------------------------------------------------------------
# Tests

COMMANDS = all_commands()


def test_readme_is_short_and_links_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    n = len(readme.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move text to docs/"
    for doc in REQUIRED_DOCS:
        assert (ROOT / "docs" / doc).is_file(), f"docs/{doc} is missing"
        assert f"](docs/{doc}" in readme, f"README.md does not link docs/{doc}"


def test_every_doc_has_commands_found():
    # The extraction itself: README's install, demo and test commands are among the commands.
    readme = [c.text for c in COMMANDS if c.source.startswith("README.md:")]
    assert any("bash tools/install.sh" in c for c in readme)
    assert any("tools/train_net.py --config-file configs/VFNet_Shapes_Demo.yaml" in c for c in readme)
    assert "python -m pytest tests -q" in readme
    assert len(COMMANDS) > 50


@pytest.mark.parametrize("command", COMMANDS, ids=[c.source for c in COMMANDS])
def test_command(command):
    errors = check_command(command.text, command.source)
    assert not errors, "\n".join([command.text, *errors])


def test_the_checker_reports_what_is_wrong():
    """The checker must be able to fail: made-up flags, configs, keys and scripts are reported."""
    good = "python tools/train_net.py --config-file configs/VFNet_R_50_FPN_1x.yaml --eval-only MODEL.WEIGHTS m.pth"
    assert check_command(good) == []
    bad = {
        "python tools/train_net.py --config-file configs/VFNet_R_50_FPN_1x.yaml --no-such-flag": "--no-such-flag",
        "python tools/train_net.py --config-file configs/No_Such_Config.yaml": "No_Such_Config.yaml",
        "python tools/train_net.py --config-file configs/VFNet_R_50_FPN_1x.yaml MODEL.VFNET.NO_SUCH_KEY 1": "NO_SUCH_KEY",
        "python tools/train_net.py --config-file configs/VFNet_R_50_FPN_1x.yaml SOLVER.MAX_ITER many": "SOLVER.MAX_ITER",
        "python tools/no_such_tool.py --help": "no_such_tool.py",
        "python demo/demo.py --config-file configs/VFNet_Shapes_Demo.yaml --inputs x.jpg": "--inputs",
        "python tools/benchmark.py --device tpu": "tpu",
        "python tools/export_model.py --config-file CONFIG --format onnx --deform-conv nope --output o/": "nope",
        "bash tools/install.sh --parity-environment venv-mmdet": "--parity-environment",
        "DETECTRON2_SOURCE=x.tar.gz bash tools/install.sh extra": "positional",
        "bash .ci/run --fast": "--fast",
        "python tools/lazyconfig_train_net.py --config-file configs/lazy/vfnet_shapes_demo.py train.no_such_key=1": "no key train.no_such_key",
        "python tools/lazyconfig_train_net.py --config-file configs/lazy/no_such.py": "no_such.py",
        "python tools/convert_mmdet_to_d2.py --arch yolo IN.pth OUT.pth": "yolo",
        "python tools/train_net.py --config-file configs/mmdet/VFNet_R_50_FPN_1x.yaml --eval-only MODEL.WEIGHTS vfnet://VFNet_R_18": "no official weights",  # noqa: E501
        "python tools/train_net.py --config-file configs/mmdet/VFNet_R2_101_FPN_MS_2x.yaml --eval-only MODEL.WEIGHTS vfnet://VFNet_R2_101_FPN_MS_2x": "no official weights",  # noqa: E501
        "python tools/train_net.py --config-file configs/mmdet/VFNet_R_50_FPN_1x.yaml --eval-only MODEL.WEIGHTS vfnet://VFNet_R_101_FPN_1x": "not the weights of",  # noqa: E501
    }
    for command, expected in bad.items():
        errors = check_command(command)
        assert errors, f"not reported: {command}"
        assert any(expected in e for e in errors), (command, errors)
    # Placeholders are fine: CONFIG, user paths, shell variables, "...".
    for ok in [
        "python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth",
        "python tools/train_net.py --config-file configs/VFNet_Shapes_Demo.yaml SEED $s OUTPUT_DIR out_$s",
        "python demo/demo.py --config-file CONFIG --webcam --opts MODEL.WEIGHTS ...",
        "venv-mmdet/bin/python -m pytest tests/parity -q",
        "python tools/benchmark.py --skip-training --skip-scaling --iters 5 --warmup 2 [--amp]",
        "wget https://example.com/x.pth && python tools/convert_mmdet_to_d2.py x.pth y.pth",
    ]:
        assert check_command(ok) == [], (ok, check_command(ok))


def test_extraction_of_blocks_and_inline_code():
    text = "\n".join([
        "Run `python tools/train_net.py",
        "--resume` here.",
        "",
        "```bash",
        "# a comment",
        "python tools/train_net.py --config-file configs/VFNet_R_50_FPN_1x.yaml \\",
        "    --eval-only",
        "```",
        "",
        "```python",
        "python = 1",
        "```",
        "    bash tools/install.sh --help",
    ])
    found = [c.text for c in extract_commands(text, "x.md")]
    assert "python tools/train_net.py --config-file configs/VFNet_R_50_FPN_1x.yaml --eval-only" in found
    assert "python tools/train_net.py --resume" in found
    assert "bash tools/install.sh --help" in found
    assert not any(c.startswith("python =") for c in found)


MODEL_ZOO_CALL = re.compile(r"model_zoo\.(get_config_file|get_config|get_checkpoint_url|get)\(\s*\"([^\"]+)\"([^)]*)\)")


def test_the_model_zoo_calls_of_the_docs_name_packaged_configs():
    calls = [(path.name, m) for path in DOCS for m in MODEL_ZOO_CALL.finditer(path.read_text(encoding="utf-8"))]
    assert any(name == "README.md" for name, _ in calls)
    for doc, m in calls:
        function, config, rest = m.groups()
        assert (ROOT / "configs" / config).is_file(), f"{doc}: model_zoo.{function}: no configs/{config}"
        if function == "get_checkpoint_url" or "trained=True" in rest:
            assert f"mmdet/{Path(config).stem}.yaml" == config and Path(config).stem in _official_weights(), (
                f"{doc}: model_zoo.{function}(\"{config}\"): no official weights to download"
            )


# ---------------------------------------------------------------------------------------------
# Links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[`*_]", "", s)
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset:
    anchors, fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fence = not fence
            continue
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m and not fence:
            anchors.add(_slug(m.group(1)))
    return frozenset(anchors)


def _links():
    out = []
    for path in DOCS:
        fence = False
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FENCE.match(line):
                fence = not fence
                continue
            if fence:
                continue
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-z]+:", target):
                    continue  # http(s):, mailto:
                out.append((f"{path.relative_to(ROOT)}:{n}", path, target))
    return out


LINKS = _links()


@pytest.mark.parametrize("source,path,target", LINKS, ids=[f"{s}:{t}" for s, _, t in LINKS])
def test_link(source, path, target):
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    assert dest.exists(), f"{source}: {target} does not exist ({dest})"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{source}: {target}: no heading #{anchor} in {dest.name}"
