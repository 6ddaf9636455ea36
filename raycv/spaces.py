"""A search-space YAML + `key=value` overrides -> one validated `Config` (raycv.config), or every problem.

    raycv validate spaces/smoke.yaml data.path=../shared/data/commonlit/train.csv
    raycv spaces                   # the shipped spaces, each with its purpose

Every problem in a file is reported at once, one line each: the dotted key, what was found, what is
expected, and a did-you-mean for a misspelt key. Each value a search can draw is checked as the config it
would produce. Relative paths resolve against the YAML's folder, then the working directory.
"""

from __future__ import annotations

import codecs
import copy
import difflib
import importlib.resources
import itertools
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from raycv import RaycvError, first_line, shown, storage
from raycv.config import (
    BACKBONE_TYPES,
    DISTRIBUTIONS,
    HUB_PREFIX,
    LEAF_KEYS,
    MINILM_ALIAS,
    SEARCHABLE,
    Config,
    DataConfig,
    Dimension,
    set_dotted,
)


def bundled_spaces_dir() -> Path:
    """Where the shipped search spaces are: inside the installed package (the wheel carries the repository's
    search_spaces/ as raycv/search_spaces, pyproject.toml's package-dir), else the source checkout's
    top-level search_spaces/ (an editable install, or the repository on PYTHONPATH)."""
    installed = importlib.resources.files("raycv") / "search_spaces"
    for candidate in (installed, Path(__file__).resolve().parent.parent / "search_spaces"):
        if isinstance(candidate, Path) and candidate.is_dir():
            return candidate
    return Path(__file__).resolve().parent.parent / "search_spaces"  # missing: resolve_space_path says so


BUNDLED_SPACES_DIR = bundled_spaces_dir()


MAX_LINES = 10  # the most lines one ConfigError prints; the last counts what it leaves out


class ConfigError(RaycvError):
    """Every problem found in one search space; `problems` holds one line per problem."""

    def __init__(self, source: str | None, problems: list[str]):
        # source None: each problem names its own file or flag (problems of several inputs at once)
        # the same line twice says nothing more (equal values of a grid, aliases of one YAML node)
        self.source, self.problems = source, list(dict.fromkeys(problems))
        super().__init__((f"{source}: " if source else "") + " | ".join(problems))

    def lines(self) -> list[str]:
        """One line per problem, each naming the file it is in; past MAX_LINES, one line counting the rest (a
        file of 20,000 unknown keys printed 20,000 lines)."""
        lines = [(f"{self.source}: " if self.source else "") + problem for problem in self.problems]
        if len(lines) <= MAX_LINES:
            return lines
        rest = len(lines) - (MAX_LINES - 1)
        return lines[:MAX_LINES - 1] + [(f"{self.source}: " if self.source else "") + f"and {rest} more problems "
                                        "like these; fix those above first"]


def resolve_space_path(arg: str | Path) -> Path:
    """The YAML the user named; a missing `spaces/NAME.yaml` (or any missing NAME.yaml) falls back to
    the bundled `search_spaces/NAME.yaml`."""
    name = Path(arg).name
    for path in (Path(arg), BUNDLED_SPACES_DIR / name):
        if path.is_file():
            return path
    if Path(arg).exists():  # a directory, a device, a pipe: nothing to read a space from
        kind = "a directory" if Path(arg).is_dir() else "not a regular file"
        raise RaycvError(f"search space {arg} is {kind}; name a YAML file (or a bundled space: raycv spaces)")
    available = ", ".join(sorted(p.name for p in BUNDLED_SPACES_DIR.glob("*.yaml")))
    raise RaycvError(f"search space {arg} not found, and no bundled one is named {name} (bundled: {available})")


def list_spaces() -> list[tuple[str, str]]:
    """(name, purpose) of every shipped space, by name: the purpose is the first sentence of the YAML's
    header comment."""
    return [(path.name, space_purpose(path.read_text())) for path in sorted(BUNDLED_SPACES_DIR.glob("*.yaml"))]


def space_purpose(text: str) -> str:
    """The first sentence of a YAML's first comment paragraph ("" without one)."""
    lines = []
    for line in text.splitlines():
        comment = line.strip().removeprefix("#").strip() if line.lstrip().startswith("#") else None
        if not comment:  # a blank comment line or the first non-comment line ends the paragraph
            break
        lines.append(comment)
    paragraph = " ".join(lines)
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def load_config(space: str | Path, overrides: list[str] | tuple[str, ...] = (), model_files: bool = True) -> Config:
    """Read, override and validate a search space; raise ConfigError listing every problem.
    model_files: also require the backbone's files (not for what needs only the data, like folds)."""
    path = resolve_space_path(space)
    try:
        raw = parse_yaml(decode_text(path.read_bytes())) or {}
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8/UTF-16, or not YAML
        raise ConfigError(str(path), [str(exc)]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [f"expected a mapping of sections at the top, found {type(raw).__name__}"])
    # A malformed override is reported with the file's other problems: every problem at once.
    problems = apply_overrides(raw, overrides)
    # Paths are resolved first, so the one validation gives the final Config; their problems come last.
    path_problems = _resolve_paths(raw, path, model_files)
    try:
        config, file_errors = Config.model_validate(raw), []
    except ValidationError as exc:
        config, file_errors = None, exc.errors()
    # The search and path checks run even when the file has other errors: every problem at once.
    problems += describe_errors(file_errors) + _check_search(raw, file_errors) + path_problems + _nul_problems(raw)
    if problems:
        raise ConfigError(str(path), problems)
    run = config.run
    run.name = path.stem if run.name is None else run.name
    run.output_dir = str(Path(run.output_dir if run.output_dir is not None else f"runs/{run.name}").resolve())
    if run.mlflow.tracking_uri and run.mlflow.experiment is None:
        run.mlflow.experiment = run.name
    if run.storage_path is None:
        run.storage_path = str(Path(run.output_dir) / "ray")
    elif "://" not in run.storage_path:
        run.storage_path = str(Path(run.storage_path).resolve())
    return config


def _nul_problems(raw: object, key: str = "", seen: set[int] | None = None) -> list[str]:
    """Keys whose text holds a NUL character, which no path or name can (the OS ends a path there; resolving
    run.output_dir raised "embedded null byte"). Each list or mapping is walked once, under the first key that
    holds it: a YAML alias bomb (each list nine aliases of the one before) is a few dozen objects, but
    387 million values when every alias is walked again, and `raycv validate` hung on one under unknown keys."""
    seen = set() if seen is None else seen
    if isinstance(raw, dict | list):
        if id(raw) in seen:
            return []
        seen.add(id(raw))
    if isinstance(raw, dict):
        return [line for k, v in raw.items() for line in _nul_problems(v, f"{key}.{k}" if key else str(k), seen)]
    if isinstance(raw, list):
        return [line for i, v in enumerate(raw) for line in _nul_problems(v, f"{key}[{i}]", seen)]
    if isinstance(raw, str) and "\0" in raw:
        return [f"{key}: {shown(raw)} holds a NUL character (\\0), which no path or name can; remove it"]
    return []


def decode_text(data: bytes) -> str:
    """A YAML file's bytes as text: UTF-8 (a BOM is allowed) or UTF-16 with its BOM, as YAML allows;
    anything else is a ValueError that says where the first bad byte is."""
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"not {encoding.removesuffix('-sig').upper()} text: byte {data[exc.start]:#04x} at line "
                         f"{line} ({exc.reason}); save the file as UTF-8") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, as YAML's spec does: PyYAML keeps the
    last one silently, so `num_folds: 5` followed further down by `num_folds: 3` ran 3 folds unsaid. Keys a
    merge (`<<: *base`) brings in may still be overridden. It also refuses an alias inside the node it names
    (`a: &x [*x]`): PyYAML builds a list that holds itself, and every walk over the config recursed until
    Python's stack ran out (a traceback)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.open_anchors: list[str] = []  # anchors of the nodes being composed, outermost first

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) and event.anchor in self.open_anchors:
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is inside the value it names (&{event.anchor}), which would "
                "hold itself for ever; repeat the value instead", event.start_mark)
        anchor = getattr(event, "anchor", None) if not isinstance(event, yaml.AliasEvent) else None
        if anchor is None:
            return super().compose_node(parent, index)
        self.open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.open_anchors.pop()

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key)} is given twice (first on line {first}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """yaml.safe_load, its errors as one-line ValueErrors: what is wrong and on which line."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 -- a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        what = getattr(exc, "problem", None) or first_line(exc)
        raise ValueError(f"not valid YAML{where}: {what}") from None
    except RecursionError:  # "maximum recursion depth exceeded while calling a Python object" said neither
        raise ValueError("not valid YAML: nested too deeply for Python to read (hundreds of levels; a search "
                         "space has four)") from None
    except (ValueError, TypeError) as exc:  # e.g. a date such as 2024-13-45
        if "integer string conversion" in str(exc):  # Python's advice (sys.set_int_max_str_digits) is no fix
            raise ValueError(f"not valid YAML: an integer of more than {sys.get_int_max_str_digits()} digits, more "
                             "than any setting takes") from None
        raise ValueError(f"not valid YAML: {exc}") from None


def discriminator_keys(model: type = Config, prefix: str = "") -> list[str]:
    """Dotted keys that pick a section's type in a discriminated union (model.backbone.type): setting one to
    another type replaces the section's other keys instead of merging into them."""
    keys = []
    for name, field in model.model_fields.items():
        if field.discriminator:
            keys.append(f"{prefix}{name}.{field.discriminator}")
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += discriminator_keys(field.annotation, f"{prefix}{name}.")
    return keys


SWITCH_KEYS = discriminator_keys()


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Set each `key=value` in `raw` (the value read as YAML); returns one problem per malformed override.

    A key that switches a section's type (model.backbone.type=pretrained over a structbert backbone) keeps
    only the keys other overrides give for the section: the old type's keys belong to no other type."""
    problems, given = [], set()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        try:
            if not sep or not key:
                raise ValueError("expected key=value, e.g. train.lr=3e-5")
            value = parse_yaml(text) if text else None
            if key in SWITCH_KEYS:
                _switch_type(raw, key, value, given)
            set_dotted(raw, key, value)
            given.add(key)
        except ValueError as exc:
            problems.append(f"override {shown(item)}: {exc}")
    return problems


def _switch_type(raw: dict, key: str, value, given: set[str]) -> None:
    *parents, field = key.split(".")
    section = _section(raw, *parents)
    if field not in section or section[field] == value:
        return
    prefix = ".".join(parents) + "."
    keep = {name: section[name] for name in section if prefix + str(name) in given}
    section.clear()
    section.update(keep)


def describe_errors(errors: ValidationError | list[dict]) -> list[str]:
    """pydantic's errors as one line each: dotted key, what was found, what is expected, a fix."""
    lines = []
    for err in errors.errors() if isinstance(errors, ValidationError) else errors:
        loc, tag = _loc_and_tag(err)
        if err["type"] == "extra_forbidden":
            # A key of another backbone type: list the keys of the type given, not a "did you mean" itself.
            known = list(BACKBONE_TYPES[tag].model_fields) if tag else _known_keys(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            fix = f"did you mean {'.'.join(loc[:-1] + hint)}?" if hint else f"known keys: {', '.join(known)}"
            if loc[:2] == ["search", "params"] and len(loc) == 4 and "." not in loc[2]:
                # search.params.train.lr={grid: [..]}, or nested YAML: the searched key was split in two
                fix = (f"a searched key is one dotted key: search.params={{{loc[2]}.{loc[3]}: {{grid: [...]}}}} "
                       f"(the samplers: {', '.join(DISTRIBUTIONS)})")
            lines.append(f"{'.'.join(loc)}: unknown key; {fix}")
        else:
            found = "" if isinstance(err.get("input"), dict) else f", found {shown(err.get('input'))}"
            lines.append(f"{'.'.join(loc) or '(top)'}: {err['msg'].removeprefix('Value error, ')}{found}")
    return lines


def _loc_and_tag(err: dict) -> tuple[list[str], str | None]:
    """An error's location as keys of the file, and the backbone type ("tiny") that a discriminated union
    puts after "backbone" in it: no key of the file."""
    loc = [str(part) for part in err["loc"]]
    at = next((i for i in range(1, len(loc)) if loc[i - 1] == "backbone" and loc[i] in BACKBONE_TYPES), None)
    tag = loc.pop(at) if at is not None else None
    return loc, tag


def _known_keys(parent: list[str]) -> list[str]:
    """The keys one level below a section (the top for []), in declaration order; below a searched key
    (search.params.KEY), its samplers."""
    if parent[:2] == ["search", "params"] and len(parent) == 3:
        return list(DISTRIBUTIONS)
    prefix = "".join(f"{part}." for part in parent)
    return list(dict.fromkeys(key[len(prefix):].split(".")[0] for key in LEAF_KEYS if key.startswith(prefix)))


def _section(raw: dict, *keys: str) -> dict:
    """raw[key][key]...; {} where a level is missing or no mapping (validation reports that)."""
    for key in keys:
        raw = raw.get(key) if isinstance(raw, dict) else None
    return raw if isinstance(raw, dict) else {}


def _check_search(raw: dict, file_errors: list[dict]) -> list[str]:
    """Every searched key exists and every value it can take is valid for that key."""
    def signature(err: dict) -> tuple[str, str, str]:  # the same error, whichever dict it was found in
        return ".".join(_loc_and_tag(err)[0]), err["type"], err["msg"]

    reported, problems = {signature(err) for err in file_errors}, []
    each_valid: dict[str, Dimension] = {}  # searched keys whose every value is valid on its own
    optuna = _section(raw, "search").get("algorithm") == "optuna"
    if optuna and not _section(raw, "search", "params"):
        problems.append("search.algorithm: optuna needs at least one key under search.params to choose values "
                        "for; add one or use search.algorithm=random")
    for key, dim_raw in _section(raw, "search", "params").items():
        if not isinstance(key, str):
            continue  # the file's validation says keys must be text
        try:
            dim = Dimension.model_validate(dim_raw)
        except ValidationError:
            continue  # already reported by the whole file's validation
        where = f"search.params.{key}"
        if optuna and dim.kind == "grid":
            problems.append(f"{where}.grid: search.algorithm optuna cannot search a grid (Optuna draws each "
                            f"value, it does not enumerate them); use choice: {list(dim.grid)} or "
                            "search.algorithm=random")
        if key == "model.backbone.type":  # each type has keys of its own: a value would need others with it
            problems.append(f"{where}: not searchable (each backbone type has keys of its own); run one search "
                            "per backbone, or search model.backbone.path between pretrained models")
            continue
        if key not in SEARCHABLE:
            hint = difflib.get_close_matches(key, sorted(SEARCHABLE), n=1)
            fix = f"did you mean {hint[0]}?" if hint else "searchable keys are under model. and train."
            problems.append(f"{where}: not a searchable key (folds stay fixed across trials); {fix}")
            continue
        found = len(problems)
        for value in dim.values_to_check():
            trial = copy.deepcopy(raw)
            try:
                set_dotted(trial, key, value)
                Config.model_validate(trial)
            except ValidationError as exc:
                # The errors this value causes (at the key, or from a check of the section holding it, e.g.
                # train's "not both") that the file without it does not already have.
                new = [err for err in exc.errors() if signature(err) not in reported]
                problems += [f"{where}.{dim.kind}: value {shown(value)} is invalid: {line}"
                             for line in describe_errors(new)]
            except ValueError:  # a section on the key's path is no mapping: the file's validation says so
                break
        else:
            if len(problems) == found:
                each_valid[key] = dim
    if not file_errors:
        problems += _check_combinations(raw, each_valid)
    scheduler = _section(raw, "scheduler")
    grace, max_t = scheduler.get("grace_period"), scheduler.get("max_t")
    if isinstance(grace, int) and isinstance(max_t, int) and grace > max_t:
        problems.append(f"scheduler.grace_period: {grace} is more than max_t {max_t}; "
                        "lower it or raise scheduler.max_t")
    return problems


COMBINATIONS_CHECKED = 512  # more than a real search's grid; each is a validation of well under a millisecond


def _check_combinations(raw: dict, dims: dict[str, Dimension]) -> list[str]:
    """Values valid one by one may not be together (train.lr x train.weight_decay must stay below 1, a hidden
    size a multiple of the heads): every combination of the values each key is checked at, as a trial can
    draw them, where there are few enough; one line per distinct problem, with the first values that cause it."""
    keys = list(dims)
    combinations = itertools.product(*(dims[key].values_to_check() for key in keys))
    seen, problems = set(), []
    for values in itertools.islice(combinations, COMBINATIONS_CHECKED) if len(keys) > 1 else ():
        trial = copy.deepcopy(raw)
        for key, value in zip(keys, values, strict=True):
            set_dotted(trial, key, value)
        try:
            Config.model_validate(trial)
        except ValidationError as exc:
            for line in describe_errors(exc.errors()):
                if line not in seen:
                    seen.add(line)
                    drawn = ", ".join(f"{key}={shown(value)}" for key, value in zip(keys, values, strict=True))
                    problems.append(f"search.params: values a trial can draw together are invalid ({drawn}): {line}")
    return problems


def _resolve_paths(raw: dict, space_path: Path, model_files: bool = True) -> list[str]:
    """Make local paths in `raw` absolute (the YAML's folder first, then the working dir); report missing ones."""
    data = raw.setdefault("data", {}) if isinstance(raw.get("data", {}), dict) else {}
    data.setdefault("path", DataConfig.model_fields["path"].default)
    backbone = _section(raw, "model", "backbone")
    kind = backbone.get("type")
    # StructBERT's three files; the directory of a pretrained model, or of a tiny model's tokenizer.
    by_type = {"structbert": ["checkpoint", "config", "vocab"], "pretrained": ["path"], "tiny": ["tokenizer"]}
    names = by_type.get(kind, []) if isinstance(kind, str) and model_files else []
    problems = []
    for key, section, name in [("data.path", data, "path")] + [(f"model.backbone.{n}", backbone, n) for n in names]:
        value, is_dir = section.get(name), key != "data.path" and kind != "structbert"
        if not isinstance(value, str) or "\0" in value:
            continue  # absent (a default applies), mistyped (reported by validation), or no path (_nul_problems)
        candidates = [Path(value)] if Path(value).is_absolute() else [space_path.parent / value, Path(value)]
        found = [c for c in candidates if (c.is_dir() if is_dir else c.is_file())]
        if found:
            section[name] = str(found[0].resolve())
        # A directory not found may be "minilm-l6", the bundled MiniLM, or hub:NAME, asked for explicitly.
        elif not is_dir or (value != MINILM_ALIAS and not value.startswith(HUB_PREFIX)):
            what = "directory" if is_dir else "file"
            tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
            hint = " (Kaggle's train.csv, competition commonlitreadabilityprize)" if key == "data.path" else ""
            there = next((c for c in candidates if c.exists()), None)  # something else by that name
            if there is None:
                problems.append(f"{key}: {what} not found (tried {tried}); set {key}=/path/to/{what}{hint}")
            else:
                problems.append(f"{key}: {there} is {storage.what_is_at(there)}, not a {what}; "
                                f"set {key}=/path/to/{what}{hint}")
    return problems
