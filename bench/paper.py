"""The paper's comparison with statistical power at CPU scale: a resumable campaign of jobs.

The protocol (fixed before running) is in docs/results.md; this file is it as code. Jobs run in a fixed
order of priority, each one resumable and idempotent:

- `sweep`: a grid Tune sweep of one method's learning rate on held-out meta-train tasks (never the
  targets); its best point becomes that method's learning rate in every arm that uses the sweep.
- `raw`: the untouched model's evaluation (zero-shot and ICL), the reference rows.
- `model`: one meta-training run (a method, an arm, a training seed), then its evaluations (ICL, and
  ICL after adaptation where the arm asks), then its learning curve is kept and its checkpoint deleted
  (a SmolLM2 checkpoint with optimizer state is 1.6 GB; the evaluations are what the report reads).

    python -m bench.paper plan                     # every job, done or not, in the order they run, with estimates
    python -m bench.paper run [--only PREFIX] [--max-jobs N] [--stop-by 14:20|2h30m]   # run what is not done
    python -m bench.paper report                   # tables, paired CIs over training seeds, plots: from what is done

Big files (checkpoints, sweep folders) go to --runs (default runs/paper); what the report reads (eval
JSON with every prediction, learning curves, sweep tables, progress.json) goes to --out (default
bench/results/paper) and is committed, and so is an unfinished job's progress, --out/partial/<job>/
(the time its attempts spent and the losses of its finished evaluation units, a few MB at most): a
session that ends, even one whose ignored files are wiped, loses at most the unit it was scoring.
With --stop-by an evaluation also stops between its units. `--size smoke` runs the same campaign on a
tiny model in minutes (the tests use it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import evaluate_to_file
from raymeta.infra.paths import paths

SEEDS = (0, 1, 2)
LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4)
LORA_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
METHODS = ("metaicl", "maml_en_llm", "fomaml", "reptile")


class StopBy(Exception):
    """--stop-by reached between two evaluation units (the finished ones are kept under partial/)."""


SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "train": {
            "k": 4,
            "tasks_per_step": 2,
            "support_size": 1,
            "query_size": 1,
            "max_length": 256,
            "max_length_per_example": 64,
            "moment_policy": "shared",
            "inner": {"optimizer": "adamw", "steps": 1},
            "outer": {"optimizer": "adamw"},
            "checkpoint_every": 10,
            "keep_checkpoints": 1,
            "distributed": False,
        },
        "steps": 60,
        "sweep": {"steps": 20, "validation": {"tasks": 4, "every": 20, "k": 4, "test_examples": 32, "seeds": 2}},
        "eval": {"k": 4, "seeds": (100, 13, 21, 42, 87), "direct": 100, "channel": 250},
        "adapt_steps": 1,
        "limited_examples": 32,
        "seeds": SEEDS,
        "lr_grid": LR_GRID,
        "lora_lr_grid": LORA_LR_GRID,
    },
    "gpu": {  # MetaICL's sizes on GPU workers (not run: no GPU was lent to this project); bf16 as docs/precision.md says
        "train": {
            "k": 16,
            "tasks_per_step": 8,
            "support_size": 4,
            "query_size": 4,
            "max_length": 1024,
            "max_length_per_example": 256,
            "moment_policy": "shared",
            "inner": {"optimizer": "adamw", "steps": 1},
            "outer": {"optimizer": "adamw"},
            "precision": "bf16_query",  # full weights: the inner loop in fp32 (LoRA arms switch to bf16 below)
            "checkpoint_every": 100,
            "keep_checkpoints": 1,
            "distributed": True,
            "use_gpu": True,
            "num_workers": 1,
            "executor": "local",
        },
        "steps": 1000,
        "sweep": {"steps": 200, "validation": {"tasks": 4, "every": 200, "k": 16, "test_examples": 64, "seeds": 2}},
        "eval": {"k": 16, "seeds": (100, 13, 21, 42, 87), "direct": None, "channel": None},
        "adapt_steps": 4,
        "limited_examples": 64,
        "seeds": SEEDS,
        "lr_grid": LR_GRID,
        "lora_lr_grid": LORA_LR_GRID,
    },
    "smoke": {
        "train": {
            "k": 2,
            "tasks_per_step": 2,
            "max_length": 256,
            "max_length_per_example": 64,
            "checkpoint_every": 2,
            "keep_checkpoints": 1,
            "distributed": False,
        },
        "steps": 2,
        "sweep": {"steps": 1, "validation": {"tasks": 1, "every": 1, "k": 2, "test_examples": 4, "seeds": 1}},
        "eval": {"k": 4, "seeds": (100, 13), "direct": 4, "channel": 4},
        "adapt_steps": 1,
        "limited_examples": 8,
        "seeds": (0, 1),
        "lr_grid": (1e-3, 1e-2),
        "lora_lr_grid": (1e-3, 1e-2),
    },
}


@dataclass(frozen=True)
class Arm:
    """One comparison: a setting, the prompt variant trained and evaluated, the weights trained, the budget."""

    name: str
    setting: str
    variant: str = "direct"
    lora: bool = False
    budget: str = "steps"  # steps: the same meta-steps; clock: MAML-en-LLM's wall-clock
    limited: bool = False
    methods: tuple[str, ...] = ("metaicl", "maml_en_llm")
    adapt: tuple[str, ...] = ()  # methods also evaluated after adaptation
    sweep: str = "c2c"  # whose learning rates: c2c (full weights) or lora


ARMS = (
    Arm("c2c", "bb_class_to_class", methods=METHODS, adapt=("metaicl", "maml_en_llm")),
    Arm("c2c-clock", "bb_class_to_class", budget="clock", methods=("metaicl", "fomaml", "reptile")),
    Arm("c2c-limited", "bb_class_to_class", limited=True),
    # h2l before c2c-channel since 2026-12-01: channel evaluations (250 examples, ~3 h a model on CPU) would
    # hold the second setting back by ~20 h (docs/results.md says so; nothing else of the protocol changed)
    Arm("h2l", "bb_hr_to_lr"),
    # c2c-lora before c2c-channel since 2026-12-02: the channel arm needs ~40 h of this CPU, the LoRA arm ~6 h
    Arm("c2c-lora", "bb_class_to_class", lora=True, sweep="lora"),
    Arm("c2c-channel", "bb_class_to_class", variant="channel"),
)


@dataclass
class Job:
    name: str
    kind: str  # sweep | raw | model
    arm: Arm | None = None
    method: str = ""
    seed: int = 0
    outputs: list[Path] = field(default_factory=list)

    def done(self) -> bool:
        return bool(self.outputs) and all(p.is_file() for p in self.outputs)


class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        self.size = SIZES[args.size]
        self.runs = Path(args.runs).resolve()
        self.out = Path(args.out).resolve()
        # the campaign's settings are BIG-bench's: by default the folder `raymeta fetch --bigbench PATH` builds
        self.model, self.data = args.model, args.data or str(paths().bigbench_data)
        self.settings = {"bb_class_to_class": args.setting, "bb_hr_to_lr": args.setting2}
        self.arms = [a for a in ARMS if args.arms is None or a.name in args.arms.split(",")]
        self.methods = tuple(args.methods.split(",")) if args.methods else METHODS
        self.stop_by: float | None = getattr(args, "stop_by", None)
        self.given: dict[str, float] = {}  # SWEEP-METHOD -> a learning rate given instead of swept
        for item in (args.lr or "").split(","):
            if item.strip():
                key, value = item.split("=")
                self.given[key.strip() if ":" in key else f"c2c:{key.strip()}"] = float(value)

    # --- the plan ----------------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        jobs: list[Job] = []
        for arm in self.arms:
            if not any(j.kind == "sweep" and j.name.startswith(f"sweep-{arm.sweep}-") for j in jobs):
                # a sweep runs just before the first arm that needs its learning rates, so a campaign cut short
                # has spent its time on the arms in their order
                for m in self._methods(*[a for a in self.arms if a.sweep == arm.sweep]):
                    out = [self.out / "sweeps" / f"{arm.sweep}-{m}.json"]
                    jobs.append(Job(f"sweep-{arm.sweep}-{m}", "sweep", method=m, outputs=out))
            raw = f"raw-{self.settings[arm.setting]}-{arm.variant}"
            if not any(j.name == raw for j in jobs):
                jobs.append(Job(raw, "raw", arm=arm, outputs=[self.out / "eval" / f"{raw}.json"]))
            for seed in self.size["seeds"]:
                for m in self._methods(arm):
                    name = f"{arm.name}-{m}-s{seed}"
                    outputs = [self.out / "eval" / f"{name}.json", self.out / "curves" / f"{name}.jsonl"]
                    if m in arm.adapt:
                        outputs.append(self.out / "eval" / f"{name}+adapt.json")
                    jobs.append(Job(name, "model", arm=arm, method=m, seed=seed, outputs=outputs))
        return jobs

    def _methods(self, *arms: Arm) -> list[str]:
        return [m for m in METHODS if m in self.methods and any(m in a.methods for a in arms)]

    # --- learning rates --------------------------------------------------------------------------
    def lr(self, sweep: str, method: str) -> float:
        path = self.out / "sweeps" / f"{sweep}-{method}.json"
        if not path.is_file():
            raise RuntimeError(f"{path}: the {sweep} sweep of {method} has not run yet")
        return float(json.loads(path.read_text())["best_lr"])

    def base(self, arm: Arm, method: str, seed: int, steps: int) -> dict[str, Any]:
        cfg = {
            **json.loads(json.dumps(self.size["train"])),
            "model": self.model,
            "data": self.data,
            "setting": self.settings[arm.setting],
            "variant": arm.variant,
            "method": method,
            "seed": seed,
            "steps": steps,
        }
        if arm.lora:
            cfg["adapter"] = {"type": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
            if cfg.get("precision") == "bf16_query":
                cfg["precision"] = "bf16"  # with LoRA, bf16 throughout stays faithful (docs/precision.md)
        if arm.limited:
            cfg["max_examples_per_task"] = self.size["limited_examples"]
        return cfg

    def steps(self, arm: Arm, method: str) -> int:
        """The arm's meta-steps for a method: the size's steps, or (budget clock) as many as fit in
        MAML-en-LLM's wall-clock, from the median s/step of the seed-0 runs of the c2c arm."""
        s = self.size["steps"]
        if arm.budget != "clock":
            return s
        maml, mine = (self._median_seconds(f"c2c-{m}-s{self.size['seeds'][0]}") for m in ("maml_en_llm", method))
        return max(s, round(s * maml / mine))

    def _median_seconds(self, name: str) -> float:
        path = self.out / "curves" / f"{name}.jsonl"
        if not path.is_file():
            raise RuntimeError(f"{path}: needed for the equal-wall-clock budget; run the c2c arm first")
        seconds = sorted(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line.strip())
        return seconds[len(seconds) // 2]

    # --- running -----------------------------------------------------------------------------------
    def run(self, job: Job) -> None:
        with self._clock(job):
            if job.kind == "sweep":
                self._sweep(job)
            elif job.kind == "raw":
                assert job.arm is not None
                modes = ("zero-shot", "icl")
                self._evaluate(job, job.outputs[0], self.model, modes=modes, adapt=False)
            else:
                self._model(job)

    def partial(self, job: Job) -> Path:
        """An unfinished job's progress, committed with the results: elapsed.json, unit.json, losses/."""
        return self.out / "partial" / job.name

    def spent(self, job: Job) -> float:
        """The time earlier, unfinished attempts at a job spent (0 if none)."""
        path = self.partial(job) / "elapsed.json"
        return float(json.loads(path.read_text())["seconds"]) if path.is_file() else 0.0

    def left(self, job: Job, estimate: float) -> float:
        """What a job's estimate leaves after its earlier attempts' time (never under a tenth of the estimate:
        a wiped checkpoint is trained again, and estimates are rough)."""
        return max(0.1 * estimate, estimate - self.spent(job))

    def units_kept(self, job: Job) -> int:
        """How many scored evaluation units (a target, a seed, a mode) of an unfinished job have their losses kept
        (a target's zero-shot units share one: their test sequences are the same for every seed)."""
        return sum(1 for _ in (self.partial(job) / "losses").rglob("*.json"))

    @contextlib.contextmanager
    def _clock(self, job: Job, every: float = 30.0) -> Iterator[Callable[[], float]]:
        """The job's time over all its attempts: what earlier, killed attempts spent (written every `every`
        seconds to partial/<job>/elapsed.json) plus this one's. A job that a session's end cut and a later
        session finished then records its whole time, not only its last part (including training redone
        when a wipe took its checkpoints), in progress.json with the CPUs its attempts ran on (sessions get
        different machines: an AVX2-only EPYC, one with AVX-512); partial/<job>/ goes when the job is done."""
        import torch

        from raymeta.infra.provenance import cpu_model_and_flags

        path = self.partial(job) / "elapsed.json"
        before = self.spent(job)
        cpu = cpu_model_and_flags()
        kernels = torch.backends.cpu.get_cpu_capability()  # pinned to AVX2 by `python -m bench.paper`
        here = f"{cpu['cpu_model']}: {' '.join(cpu['cpu_flags'])} (kernels {kernels})"
        kept = json.loads(path.read_text()).get("cpus", []) if path.is_file() else []
        cpus = kept + [here] * (here not in kept)
        began, stop = time.time(), threading.Event()

        def spent() -> float:
            return before + time.time() - began

        def beat() -> None:
            while not stop.wait(every):
                _write_json(path, {"seconds": round(spent(), 1), "cpus": cpus})

        thread = threading.Thread(target=beat, name=f"clock-{job.name}", daemon=True)
        thread.start()
        try:
            yield spent
        finally:
            stop.set()
            thread.join()
            _write_json(path, {"seconds": round(spent(), 1), "cpus": cpus})
        progress = self.read_progress()  # done (an exception skips this): recorded before partial/ goes
        finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        progress[job.name] = {"seconds": round(spent(), 1), "finished": finished, "cpus": cpus}
        units = self.partial(job) / "unit.json"  # its units' times: the next jobs of its arm judge theirs by them
        by_kind = json.loads(units.read_text()).get("by_kind") if units.is_file() else None
        if by_kind:
            progress[job.name]["unit_seconds"] = by_kind
        _write_json(self.out / "progress.json", progress)
        shutil.rmtree(self.partial(job))

    def _sweep(self, job: Job) -> None:
        import yaml

        from raymeta.tune.run import run_sweep
        from raymeta.tune.sweep import load_sweep

        sweep_name, method = job.name.split("-")[1], job.method
        if f"{sweep_name}:{method}" in self.given:  # the user fixed it: recorded as given, no sweep
            _write_json(job.outputs[0], {"given": True, "trials": [], "best_lr": self.given[f"{sweep_name}:{method}"]})
            return
        arm = next(a for a in self.arms if a.sweep == sweep_name)
        grid = self.size["lora_lr_grid"] if sweep_name == "lora" else self.size["lr_grid"]
        config = {**self.base(arm, method, 0, self.size["sweep"]["steps"]), **self.size["sweep"]}
        for key in ("distributed", "use_gpu", "num_workers", "executor"):  # a sweep's trials: its `resources`
            config.pop(key, None)
        key = "outer.lr" if method == "metaicl" else "inner.lr+outer.lr"
        choices = [lr if method == "metaicl" else [lr, lr] for lr in grid]
        folder = self.runs / "sweeps" / f"{sweep_name}-{method}"
        spec = {
            "name": f"{sweep_name}-{method}",
            "config": config,
            "metric": "val_score",
            "max_concurrent_trials": 2 if self.size is SIZES["smoke"] else 1,  # a GPU or a 2-core CPU runs one at a time
            "seed": 0,
            "search": "grid",
            "scheduler": {"type": "none"},
            "resources": self._sweep_resources(),
            "space": {key: {"choice": choices}},
            "out": str(folder),
        }
        folder.parent.mkdir(parents=True, exist_ok=True)
        path = folder.parent / f"{sweep_name}-{method}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        run_sweep(load_sweep(path), resume=(folder / "experiment").exists(), verbose=0)
        rows = []
        with (folder / "trials.csv").open() as f:  # the sweep's own table: the trials Tune finished (not orphans)
            for row in csv.DictReader(f):
                if row["status"] != "completed":
                    continue
                trial = folder / "trials" / row["trial_id"]
                cfg = yaml.safe_load((trial / "config.yaml").read_text())
                last = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines() if x.strip()][-1]
                rows.append({"lr": cfg["outer"]["lr"], "val_score": last.get("val_score"), "val_loss": last.get("val_loss")})
        rows.sort(key=lambda r: r["lr"])
        scored = [r for r in rows if r["val_score"] is not None]
        best = max(scored, key=lambda r: (r["val_score"], -(r["val_loss"] or 0.0)))  # ties: the lower gold-option loss
        _write_json(job.outputs[0], {"sweep": spec, "trials": rows, "best_lr": best["lr"]})

    def _sweep_resources(self) -> dict[str, Any]:
        if self.size is SIZES["gpu"]:
            return {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4, "executor": "local"}
        return {"num_workers": 1, "cpus_per_worker": 2 if self.size is SIZES["cpu"] else 0.5, "executor": "local"}

    def _model(self, job: Job) -> None:
        from raymeta.config import TrainConfig, apply_overrides
        from raymeta.run.api import train
        from raymeta.run.checkpoint import latest_checkpoint

        arm = job.arm
        assert arm is not None
        lr = self.lr(arm.sweep, job.method)
        cfg_dict = self.base(arm, job.method, job.seed, self.steps(arm, job.method))
        cfg_dict["inner"] = {**cfg_dict.get("inner", {}), "lr": lr}
        cfg_dict["outer"] = {**cfg_dict.get("outer", {}), "lr": lr}
        cfg_dict["out"] = str(self.runs / job.name)
        eval_json, curve = job.outputs[0], job.outputs[1]
        if not all(p.is_file() for p in job.outputs[:1] + job.outputs[2:]):
            cfg = apply_overrides(TrainConfig(), cfg_dict, job.name).validate(job.name)
            resume = latest_checkpoint(Path(cfg.run.out)) is not None
            final = str(train(cfg, resume=resume, progress=True))
            curve.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(cfg.run.out) / "metrics.jsonl", curve)
            self._evaluate(job, eval_json, final, modes=("icl",), adapt=False)
            if job.method in arm.adapt:
                self._evaluate(job, job.outputs[2], final, modes=("icl",), adapt=True)
        if not curve.is_file():
            shutil.copyfile(self.runs / job.name / "metrics.jsonl", curve)
        shutil.rmtree(self.runs / job.name / "checkpoints", ignore_errors=True)  # evaluated: the weights are not needed

    def _evaluate(self, job: Job, path: Path, model_spec: str, *, modes: tuple[str, ...], adapt: bool) -> None:
        from raymeta.eval.adapt import AdaptConfig
        from raymeta.eval.icl import EvalConfig

        if path.is_file():  # done: its checkpoint may be deleted already
            return
        arm = job.arm
        assert arm is not None
        e = self.size["eval"]
        cfg = EvalConfig(
            k=e["k"],
            seeds=tuple(e["seeds"]),
            variants=(arm.variant,),
            modes=modes,
            max_test_examples=e[arm.variant],
            truncation="shared",
            adapt=AdaptConfig(self.size["adapt_steps"]) if adapt else None,
        )
        partial = self.partial(job)
        evaluate_to_file(
            path, path.stem, model_spec, self.data, self.settings[arm.setting], cfg,
            cache_dir=partial / "losses", before_unit=self._stop_between_units(job, partial / "unit.json", path.stem),
        )  # fmt: skip

    def _stop_between_units(self, job: Job, record: Path, evaluation: str = "") -> Callable[[Any], None] | None:
        """With --stop-by, a check before each evaluation unit: stop (StopBy) when the unit would end after the
        deadline, judged by the longest unit of its kind (variant, modes, target) seen so far in any attempt,
        else by the longest unit of any kind (both kept in `record`): a channel evaluation's first target took
        ~21 min a unit, its later ones 3-5. Units found in the loss cache take well under a second and are not
        recorded (a kind known only from cache hits is judged by the longest of any). A kind this job has not
        timed yet is judged by the longest unit of that kind in the finished jobs of its arm (progress.json keeps
        their unit times; the two methods' evaluations cost the same), else by the longest of any kind in this
        job or those; with none of either, the first unscored unit of the first attempt always runs. A unit an
        earlier attempt finished (`record` lists them per `evaluation`) is in the loss cache and is not judged:
        judged at its kind's time, a restart with less than that left stopped before replaying its cached units."""
        if self.stop_by is None:
            return None
        deadline = self.stop_by
        kept = json.loads(record.read_text()) if record.is_file() else {}
        longest = float(kept.get("longest_seconds", 0.0))
        by_kind: dict[str, float] = {k: float(v) for k, v in kept.get("by_kind", {}).items()}
        scored: set[str] = set(kept.get("scored", []))  # "<evaluation>: <kind> seed <seed>" of finished units
        prior = self._unit_times(job)
        longest_before = max(prior.values(), default=0.0)
        began, began_kind, began_unit = 0.0, "", ""  # the unit before this one: when it began, its kind and name

        def check(unit: Any) -> None:
            nonlocal longest, began, began_kind, began_unit
            now, kind = time.time(), f"{unit.variant}/{'+'.join(unit.modes)} {unit.task}"
            took = now - began
            if began_kind:  # the unit before this one has finished
                # a unit found in the loss cache takes well under a second: not a measure of its kind
                if took >= 1.0 and took > by_kind.get(began_kind, 0.0):
                    longest, by_kind[began_kind] = max(longest, took), took
                scored.add(began_unit)
                rounded = {k: round(v, 1) for k, v in by_kind.items()}
                _write_json(record, {"longest_seconds": round(longest, 1), "by_kind": rounded, "scored": sorted(scored)})
            began, began_kind, began_unit = now, kind, f"{evaluation}: {kind} seed {unit.seed}"
            if began_unit in scored:
                return  # in the loss cache: replayed in well under a second
            expect = by_kind.get(kind, prior.get(kind, max(longest, longest_before)))
            if now + expect > deadline:
                raise StopBy(
                    f"stopping {job.name} before {kind} seed {unit.seed}: units "
                    f"{'like it ' if kind in by_kind or kind in prior else ''}take up to {expect / 60:.0f} min, "
                    f"{max(0.0, deadline - now) / 60:.0f} min are left before --stop-by (finished units are kept)"
                )

        return check

    def _unit_times(self, job: Job) -> dict[str, float]:
        """The longest evaluation unit of each kind in the finished jobs of a job's arm (from progress.json)."""
        arm = job.arm.name if job.arm is not None else None
        mine = {j.name for j in self.jobs() if j.arm is not None and j.arm.name == arm and j.name != job.name}
        times: dict[str, float] = {}
        for name, entry in self.read_progress().items():
            for kind, seconds in (entry.get("unit_seconds", {}) if name in mine else {}).items():
                times[kind] = max(times.get(kind, 0.0), float(seconds))
        return times

    def estimate(self, job: Job) -> tuple[float, str] | None:
        """About how long a pending job takes, from progress.json: the longest finished run of the same arm
        and method (another training seed); else that of the same method in arm c2c scaled by how this arm's
        other method compares with c2c's (h2l evaluates without adaptation and takes ~0.7x; c2c-limited and
        c2c-lora train less; the ratio predicts their longest MAML-en-LLM runs 17 % low at worst), except in a
        channel arm, whose prompt changes only the evaluation, the same for both methods: there this arm's
        other method plus c2c's difference between the two (a ratio would scale a 135-min evaluation by 1.5);
        else, for a channel arm, c2c's plus how much longer the raw model's channel evaluation took than its
        direct one (none before that has run: a channel evaluation takes hours more than a direct one); else
        c2c's unscaled, a rough guess. Before 2026-12-02 a job resumed from a checkpoint recorded only its
        last part (now `_clock` adds earlier attempts' time), hence the longest."""
        if job.kind != "model" or job.arm is None:
            return None
        progress = self.read_progress()

        def longest(arm: str, method: str) -> float | None:
            prefix = f"{arm}-{method}-s"
            seen = [v["seconds"] for k, v in progress.items() if k.startswith(prefix) and k[len(prefix) :].isdigit()]
            return max(seen) if seen else None

        same = longest(job.arm.name, job.method)
        if same is not None:
            return same, "another seed"
        base = longest("c2c", job.method)
        if base is None:
            return None
        setting, variant = self.settings[job.arm.setting], job.arm.variant
        for other in self.methods:
            here, there = longest(job.arm.name, other), longest("c2c", other)
            if other != job.method and here is not None and there:
                if variant != "direct":  # the prompt changes the evaluation, which costs the same for both methods
                    return here + max(0.0, base - there), f"this arm's {other} plus c2c's difference"
                return base * here / there, f"c2c scaled by this arm's {other}"
        raw_variant, raw_direct = (progress.get(f"raw-{setting}-{v}", {}).get("seconds") for v in (variant, "direct"))
        if variant != "direct":
            if raw_variant is None or raw_direct is None:
                return None
            # a model's evaluation costs about what the raw model's does, so c2c's plus the difference: an upper
            # estimate (the raw job evaluates zero-shot and ICL, a model job only ICL)
            return base + max(0.0, raw_variant - raw_direct), f"c2c plus the raw {variant} evaluation's extra time"
        return base, "c2c, a rough guess"

    def read_progress(self) -> dict[str, Any]:
        path = self.out / "progress.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, obj: Any) -> None:
    from raymeta.infra.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def _deadline(text: str) -> float:
    """--stop-by as epoch seconds: HH:MM (local time, today) or a duration such as 2h30m, 90m, 45s."""
    import re

    if m := re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip()):
        hour, minute = int(m[1]), int(m[2])
        if hour > 23 or minute > 59:
            raise argparse.ArgumentTypeError(f"{text!r} is not a clock time (HH:MM, 00:00 to 23:59)")
        now = time.localtime()
        at = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hour, minute, 0, 0, 0, -1))
        if at <= time.time():
            raise argparse.ArgumentTypeError(f"{text} has already passed today; give a duration such as 2h30m instead")
        return at
    if (m := re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())) and any(m.groups()):
        return time.time() + 3600 * int(m[1] or 0) + 60 * int(m[2] or 0) + int(m[3] or 0)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a clock time HH:MM or a duration such as 2h30m, 90m or 45s")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("plan", "run", "report"))
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--model", default="builtin")
    ap.add_argument(
        "--data",
        default=None,
        help="data folder (default: the bb_* settings that `raymeta fetch --bigbench PATH` builds)",
    )
    ap.add_argument("--setting", default="bb_class_to_class", help="the primary setting")
    ap.add_argument("--setting2", default="bb_hr_to_lr", help="the second setting")
    ap.add_argument("--arms", default=None, help="only these arms (comma-separated: " + ",".join(a.name for a in ARMS) + ")")
    ap.add_argument("--methods", default=None, help="only these methods")
    ap.add_argument(
        "--lr",
        default=None,
        help="fix learning rates instead of sweeping them: METHOD=LR[,...] (the c2c sweep) or SWEEP:METHOD=LR",
    )
    ap.add_argument("--only", default=None, help="run only jobs whose name starts with this")
    ap.add_argument("--max-jobs", type=int, default=None, help="stop after this many jobs")
    ap.add_argument(
        "--stop-by",
        type=_deadline,
        default=None,
        metavar="HH:MM|DURATION",
        help="start no job whose estimate (see plan) ends after this clock time today or this long from now (2h30m),"
        " and no evaluation unit that would (a unit takes as long as the longest of its target and mode seen so far"
        " in this job, else in the finished jobs of its arm, else the longest of any)",
    )
    ap.add_argument(
        "--start-long",
        action="store_true",
        help="with --stop-by, start a job even when its estimate ends after it: its training (minutes) runs whole and"
        " its evaluation stops between units at --stop-by, the finished units kept for the next run",
    )
    ap.add_argument("--runs", default="runs/paper", help="checkpoints and sweep folders (big; not committed)")
    ap.add_argument("--out", default="bench/results/paper", help="evaluations, curves, sweep tables, progress, report")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.start_long and args.stop_by is None:
        ap.error("--start-long needs --stop-by (the time at which the job's evaluation stops)")
    campaign = Campaign(args)
    jobs = campaign.jobs()
    if args.command == "plan":
        total, unknown = 0.0, 0
        for job in jobs:
            guess = None if job.done() else campaign.estimate(job)
            note = f"  ~{guess[0] / 60:.0f} min ({guess[1]})" if guess else ""
            if not job.done() and (spent := campaign.spent(job)):
                note += f"  ({spent / 60:.0f} min spent so far"
                note += f", {n} scored units kept)" if (n := campaign.units_kept(job)) else ")"
            print(f"{'done   ' if job.done() else 'pending'}  {job.name}{note}")
            total += campaign.left(job, guess[0]) if guess else 0
            unknown += not job.done() and guess is None
        print(f"{sum(j.done() for j in jobs)} of {len(jobs)} jobs done", end="")
        if total:
            print(f"; the pending ones take about {total / 3600:.1f} h", end="")
            print(f" or more ({unknown} without an estimate)" if unknown else "", end="")
        elif unknown:
            print(f"; none of the {unknown} pending has an estimate yet", end="")
        print()
        return 0
    if args.command == "report":
        from bench.paper_report import report

        print(report(campaign, jobs))
        return 0
    ran = 0
    for job in jobs:
        if job.done() or (args.only and not job.name.startswith(args.only)):
            continue
        if args.max_jobs is not None and ran >= args.max_jobs:
            break
        guess = campaign.estimate(job)
        need = campaign.left(job, guess[0]) if guess else None  # what is left after earlier attempts
        if args.stop_by is not None and guess and need is not None and time.time() + need > args.stop_by:
            left = max(0.0, args.stop_by - time.time())
            takes = f"takes about {guess[0] / 60:.0f} min" + (f" ({need / 60:.0f} more)" if need < guess[0] else "")
            if args.start_long and left > 0:
                print(
                    f"[paper] {job.name}: {takes}, {left / 60:.0f} min are left;"
                    " --start-long: its evaluation stops between units at --stop-by",
                    flush=True,
                )
            else:
                print(f"[paper] stopping before {job.name}: it {takes}, {left / 60:.0f} min are left before --stop-by")
                break
        print(f"[paper] {job.name}: running", flush=True)
        try:
            campaign.run(job)
        except StopBy as stop:
            print(f"[paper] {stop}", flush=True)
            break
        ran += 1
        print(f"[paper] {job.name}: done", flush=True)
    return 0


# PyTorch's, MKL's and oneDNN's CPU kernels pick their code path (AVX2, AVX-512, AMX) by the CPU, and the
# paths sum in different orders: a session on an AVX-512 EPYC retrained a job 5e-5 off the AVX2 sessions'
# losses (8e-6 at the first forward pass), so its weights' fingerprint changed and its kept evaluation units
# were scored again. Pinned to AVX2 (what every session's CPU has had), the retraining on that AVX-512
# machine gave the AVX2 sessions' losses and gradient norms bit for bit. Ray's workers inherit them.
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels(environ: MutableMapping[str, str]) -> None:
    """Set PINNED_KERNELS in `environ` (before torch is imported) on x86-64, keeping any already set."""
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        for key, value in PINNED_KERNELS.items():
            environ.setdefault(key, value)


if __name__ == "__main__":
    import os

    pin_cpu_kernels(os.environ)
    raise SystemExit(main())
