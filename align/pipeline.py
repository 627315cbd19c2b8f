"""``align run``: the whole chain from one pipeline recipe, resumable stage by stage, ending in a report.

Each stage runs as its own ``align <stage>`` process in ``<output_dir>/<name>``, so it writes its own lock and can
be resumed exactly as a user would.  A stage is skipped when it finished and its fingerprint (the stage recipe's
sha256 with the pipeline's overrides, the bytes of its local data files, and the fingerprint of the stage it starts
from) is unchanged; a stage that was interrupted is resumed; a finished stage whose fingerprint changed is moved
aside (``<name>.replaced-<time>``), never deleted, and run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from align import recipe as recipes
from align.stage import FINAL_MARKER, write_json

log = logging.getLogger(__name__)
FINGERPRINTS = ".pipeline"   # <output_dir>/.pipeline/<stage>.json: what each stage folder was made from


@dataclasses.dataclass
class StageEntry:
    name: str = dataclasses.field(metadata={"help": "folder name under output_dir, and the id later stages use"})
    recipe: str = dataclasses.field(metadata={"help": "the stage recipe file (its stage is read from the name)"})
    start_from: str | None = dataclasses.field(
        default=None, metadata={"help": "a previous stage whose output becomes this stage's model.path"})
    overrides: list[str] = dataclasses.field(default_factory=list, metadata={"help": "key.sub=value overrides"})


@dataclasses.dataclass
class ExportEntry:
    out: str = dataclasses.field(metadata={"help": "exported Hugging Face folder"})
    dtype: str = dataclasses.field(default="fp32", metadata={"help": "bf16 | fp16 | fp32"})


@dataclasses.dataclass
class EvalEntry:
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["math", "code"])
    k: list[int] = dataclasses.field(default_factory=lambda: [1, 8])
    n: int = dataclasses.field(default=8, metadata={"help": "samples per problem"})
    temperature: float = dataclasses.field(default=1.0)
    max_new_tokens: int = dataclasses.field(default=64)
    limit: int | None = dataclasses.field(default=None, metadata={"help": "problems per task"})
    base: bool = dataclasses.field(default=True, metadata={"help": "also score the untrained starting model"})


@dataclasses.dataclass
class PipelineRecipe:
    output_dir: str
    seed: int
    stages: list[StageEntry]
    export: ExportEntry | None = None
    eval: EvalEntry | None = None


recipes.register_stage("pipeline", PipelineRecipe)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_files(raw: dict) -> list[Path]:
    """Local files a stage reads (data sources and held-out sets)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("path", "heldout_math") and isinstance(v, str) and Path(v).is_file():
                    found.append(Path(v))
                elif k == "exclude" and isinstance(v, list):   # generated prompts depend on what they avoid
                    found.extend(Path(x) for x in v if isinstance(x, str) and Path(x).is_file())
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk({k: raw[k] for k in ("data", "eval") if k in raw})
    return sorted(set(found))


class Pipeline:
    def __init__(self, loaded: recipes.Loaded):
        self.recipe: PipelineRecipe = loaded.recipe
        self.out = Path(self.recipe.output_dir)
        self.fingerprints: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def stage_args(self, entry: StageEntry) -> list[str]:
        args = [f"output_dir={self.out / entry.name}", f"seed={self.recipe.seed}", *entry.overrides]
        if entry.start_from:
            if entry.start_from not in self.fingerprints:
                raise recipes.RecipeError(f"stages.{entry.name}.start_from: no earlier stage named "
                                          f"{entry.start_from!r}")
            args.insert(0, f"model.path={self.out / entry.start_from}")
        return args

    def fingerprint(self, entry: StageEntry, stage: str, args: list[str]) -> str:
        loaded = recipes.load(stage, entry.recipe, args, check_files=False)
        parts = {"recipe_sha256": loaded.sha256,
                 "data": {str(p): _file_sha(p) for p in _data_files(loaded.resolved)},
                 "upstream": self.fingerprints.get(entry.start_from or "", None)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def run_stage(self, entry: StageEntry) -> None:
        stage = recipes.stage_of(entry.recipe)
        args = self.stage_args(entry)
        fp = self.fingerprint(entry, stage, args)
        self.fingerprints[entry.name] = fp
        folder = self.out / entry.name
        saved = self.out / FINGERPRINTS / f"{entry.name}.json"
        finished = (folder / FINAL_MARKER).exists()
        same = saved.exists() and json.loads(saved.read_text())["fingerprint"] == fp
        if finished and same:
            log.info("stage %s: unchanged and finished, skipped", entry.name)
            return
        resume = False
        if folder.exists() and any(folder.iterdir()):
            if same and not finished:
                resume = True
                log.info("stage %s: resuming the interrupted run", entry.name)
            else:
                aside = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                log.info("stage %s: inputs changed, moving the old run to %s", entry.name, aside)
                folder.rename(aside)
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_json(saved, {"fingerprint": fp, "recipe": entry.recipe, "overrides": args})
        cmd = [sys.executable, "-m", "align", stage, "--config", entry.recipe, *(["--resume"] if resume else []),
               *args]
        self._call(entry.name, cmd)

    def _call(self, name: str, cmd: list[str]) -> None:
        log.info("stage %s: %s", name, " ".join(cmd))
        t0 = time.perf_counter()
        res = subprocess.run(cmd)
        self.timings[name] = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"align run: stage {name} failed with exit code {res.returncode}; "
                             f"fix it and re-run `align run` to continue from there")

    def export(self) -> Path | None:
        exp = self.recipe.export
        if exp is None:
            return None
        last = self.out / self.recipe.stages[-1].name
        self._call("export", [sys.executable, "-m", "align", "export", "--checkpoint", str(last), "--out", exp.out,
                              "--dtype", exp.dtype, "--force"])
        return Path(exp.out)

    def evaluate(self, models: dict[str, Path]) -> dict[str, dict]:
        ev = self.recipe.eval
        results = {}
        if ev is None:
            return results
        for name, path in models.items():
            out = self.out / "eval" / name
            if (out / "eval.json").exists() and self._eval_fresh(out, path):
                log.info("eval %s: up to date, skipped", name)
            else:
                cmd = [sys.executable, "-m", "align", "eval", "--model", str(path), "--tasks", ",".join(ev.tasks),
                       "--k", ",".join(map(str, ev.k)), "--n", str(ev.n), "--temperature", str(ev.temperature),
                       "--max-new-tokens", str(ev.max_new_tokens), "--out", str(out), "--seed", str(self.recipe.seed)]
                if ev.limit:
                    cmd += ["--limit", str(ev.limit)]
                self._call(f"eval {name}", cmd)
                write_json(out / "source.json", {"model": str(path), "stamp": self._stamp(path)})
            results[name] = json.loads((out / "eval.json").read_text())
        return results

    @staticmethod
    def _stamp(path: Path) -> str:
        marker = path / FINAL_MARKER
        target = marker if marker.exists() else path / "config.json"
        return f"{target.stat().st_mtime_ns}" if target.exists() else ""

    def _eval_fresh(self, out: Path, path: Path) -> bool:
        src = out / "source.json"
        return src.exists() and json.loads(src.read_text()).get("stamp") == self._stamp(path)

    def base_model(self) -> Path | None:
        """The untrained starting point of the first stage, saved once so it can be scored like the others."""
        first = self.recipe.stages[0]
        stage = recipes.stage_of(first.recipe)
        loaded = recipes.load(stage, first.recipe, self.stage_args(first), check_files=False)
        model = loaded.resolved["model"]
        if model.get("path"):
            return Path(model["path"])
        folder = self.out / "base"
        if not (folder / "config.json").exists():
            from align.checkpoint import DTYPES
            from align.model import build_model, load_tokenizer

            tok = load_tokenizer(model["tokenizer"])
            m = build_model(model["preset"], None, tok, DTYPES[model["dtype"]], self.recipe.seed,
                            model.get("overrides") or {})
            tmp = folder.with_name("base.tmp")
            m.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            tmp.rename(folder)
        return folder


def run(loaded: recipes.Loaded, resume: bool = False) -> dict:
    from align.report import write_report

    pipe = Pipeline(loaded)
    pipe.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for entry in pipe.recipe.stages:
        pipe.run_stage(entry)
    exported = pipe.export()
    models = {}
    if pipe.recipe.eval and pipe.recipe.eval.base:
        models["base"] = pipe.base_model()
    models.update({e.name: pipe.out / e.name for e in pipe.recipe.stages})
    evals = pipe.evaluate(models)
    summary = {"stages": [e.name for e in pipe.recipe.stages], "exported": str(exported) if exported else None,
               "seconds": time.perf_counter() - t0, "stage_seconds": pipe.timings}
    report = write_report(pipe.out, pipe.recipe, evals, summary)
    log.info("pipeline done in %.0fs; report: %s", summary["seconds"], report)
    return summary
