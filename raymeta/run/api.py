"""The two things a user runs: `train(cfg)` (meta-training) and `evaluate(model, ...)` (MetaICL's protocol).

import raymeta

cfg = raymeta.load_config("configs/tiny.yaml", ["steps=4"])
final = raymeta.train(cfg)                       # the final checkpoint folder
results = raymeta.evaluate(str(final), k=4, variants=("direct",), modes=("icl",), max_test_examples=10)
print(results["runs"]["direct/icl"]["all"]["mean"])
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from raymeta.config import TrainConfig, apply_overrides, flatten, to_dict, with_absolute_paths
from raymeta.core.device import resolve_device
from raymeta.data import open_data
from raymeta.data.layout import DataDir
from raymeta.errors import UserError, first_line
from raymeta.eval.adapt import AdaptConfig
from raymeta.eval.icl import EvalConfig, LossCache, evaluate_setting
from raymeta.infra.io import sha256_file
from raymeta.infra.paths import paths
from raymeta.infra.ray_session import connect, describe, joined_address
from raymeta.infra.storage import RunStore
from raymeta.model.load import check_weights, load_model, load_tokenizer, resolve_model_dir
from raymeta.run.callbacks import StepHook, standard_callbacks
from raymeta.run.checkpoint import MANIFEST, latest_step, usable_checkpoint
from raymeta.run.lock import clean_orphans, run_lock
from raymeta.run.ray_train import fit
from raymeta.run.tracking import check_tracking
from raymeta.run.trainer import Local, MetaTrainer, Restored, preflight

__all__ = ["adaptation_as_trained", "evaluate", "train"]


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    root: Path | None = None,
    address: str | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    callbacks: list[Any] | None = None,
    after_step: StepHook | None = None,
    allow_changes: bool = False,
    ray_logs: bool = False,
) -> Path | str:
    """Run (or resume) meta-training, on Ray Train workers or (distributed=false) in this process;
    returns the final checkpoint (a local folder, or its URI when `out` is on object storage).

    `on_step(metrics)` runs in this process after each step (single-process runs only); `after_step(rank,
    metrics)` runs on every worker after each step and its checkpoint (it must pickle: a module-level
    function or object); `callbacks` are Ray Train callbacks (e.g. Tune's `TuneReportCallback`).

    A resumed run must ask for the config its checkpoint was trained with, but for its steps,
    checkpointing and logging; `allow_changes` lets the placement keys (devices, workers) differ too.
    `ray_logs` shows the Ray processes' own output here (off: one progress line per meta-step)."""
    cfg.validate()
    if cfg.placement.distributed or cfg.placement.executor == "ray":
        joined_address(address)  # --address against $RAY_ADDRESS: one line, before anything
    if not resume:
        check_weights(cfg.run.model, cfg.weights, root)  # trainable / adapter.* against the model's names, before anything
    check_tracking(cfg)  # MLflow missing, or no place for its store: one line, before anything
    store = RunStore(cfg.run.out)
    store.check_writable()  # unreachable or read-only storage: one line, before anything starts
    with run_lock(store.local) if store.local is not None else contextlib.nullcontext():
        if store.local is not None:
            clean_orphans(store.local)
        return _train_locked(cfg, store, resume, progress, root, address, on_step, callbacks, after_step, allow_changes, ray_logs)


def _train_locked(
    cfg: TrainConfig,
    store: RunStore,
    resume: bool,
    progress: bool,
    root: Path | None,
    address: str | None,
    on_step: Callable[[dict[str, Any]], None] | None,
    callbacks: list[Any] | None,
    after_step: StepHook | None,
    allow_changes: bool,
    ray_logs: bool,
) -> Path | str:
    latest = latest_step(store)
    if not resume and latest is not None:
        raise UserError(
            f"{cfg.run.out}: holds checkpoints of an earlier run; pass --resume to continue it or choose another out", key="out"
        )
    restored = None
    if resume:
        found = usable_checkpoint(store)  # the newest whole checkpoint; broken newer ones are set aside, with a warning
        if found is None:
            raise UserError(f"no checkpoint in {store.uri('checkpoints')}", key="resume")
        latest = found[0]
        restored = Restored.read(found[1], store.uri(latest))
        check_resume_config(restored.state.get("config") or {}, to_dict(cfg), allow_changes, restored.location)
        if restored.state["step"] >= cfg.run.steps:
            return _final(store, restored.location)  # already finished: nothing to resume
    if not cfg.placement.distributed or joined_address(address) is None:
        resolve_device(cfg.placement.device)  # CUDA asked for where there is none: one line, before anything starts
    if cfg.placement.distributed:
        preflight(cfg, root)
        final = fit(
            cfg,
            store,
            latest,
            address=address,
            progress=progress,
            root=root,
            callbacks=callbacks,
            after_step=after_step,
            ray_logs=ray_logs,
        )
        return _final(store, final)
    if cfg.placement.executor == "ray":  # tasks as Ray tasks from this process
        connect(address, log_to_driver=ray_logs)
        if progress:
            print(f"[raymeta] {describe()}", flush=True)
    backend = Local(store, resolve_device(cfg.placement.device), restored)
    hooks = standard_callbacks(cfg, progress=progress, on_step=on_step, after_step=after_step)
    done = MetaTrainer(cfg, backend, hooks, root=root).fit()
    assert done is not None
    return _final(store, done)


# A resumed run may always change how long it runs and how it checkpoints and logs ...
RUN_CONTROL = (
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "validation.every",
    "tracking",
    "tracking_uri",
    "tracking_experiment",
)
# ... and, with `allow_changes`, where it runs: the same algorithm, but a trajectory that is bit-exact only
# on the same placement (another number of workers sums the meta-gradients in another order).
PLACEMENT = (
    "device",
    "distributed",
    "num_workers",
    "executor",
    "cpus_per_worker",
    "cpus_per_task",
    "use_gpu",
    "gpus_per_task",
    "max_failures",
    "placement_strategy",
)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume_config(saved: dict[str, Any], wanted: dict[str, Any], allow_changes: bool, where: str) -> None:
    """Refuse to resume with a config other than the checkpoint's, in one line naming the changed keys.
    `out` (a moved run folder) and the `RUN_CONTROL` keys may differ; the `PLACEMENT` keys with
    `allow_changes`; anything else (the method, learning rates, data, k, seed, ...) never."""
    if not saved:
        return  # a checkpoint from before configs were recorded: nothing to compare
    old, new = flatten(with_absolute_paths(saved)), flatten(with_absolute_paths(wanted))  # distributed runs record absolute ones
    # a key newer than the checkpoint (inner.grad_clip, outer.schedule, ...) counts as its default there
    defaults = flatten(to_dict(TrainConfig()))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, defaults.get(k)) != new.get(k))
    refused = [k for k in changed if k != "out" and k not in RUN_CONTROL and not (allow_changes and k in PLACEMENT)]
    if not refused:
        return
    shown = ", ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in refused[:4])
    more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
    if all(k in PLACEMENT for k in refused):
        hint = "pass --allow-changes to run it elsewhere (no longer bit-exact)"
    else:
        hint = (
            "only steps, checkpointing and (with --allow-changes) placement may change; "
            "start a new run from the checkpoint (model=...) instead"
        )
    raise UserError(f"{where}: trained with another config ({shown}{more}); {hint}", key="resume")


def _final(store: RunStore, location: str) -> Path | str:
    return location if store.remote else Path(location)


def evaluate(
    model: str | torch.nn.Module,
    tokenizer: Any = None,
    *,
    setting: str = "mix_to_mix",
    data: str | Path | DataDir | None = None,
    config: EvalConfig | None = None,
    cache: bool = True,
    progress: bool = False,
    root: Path | None = None,
    device: str = "auto",
    dtype: str = "float32",
    base_model: str | None = None,
    merge: bool = False,
    samples: list[dict[str, Any]] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a model with MetaICL's protocol on a setting's target tasks; returns the results dict
    (`results["runs"]["direct/icl"]["all"]["mean"]`, ...) that `raymeta eval` writes as results.json.

    `model` is `"builtin"`, a Hugging Face folder or a raymeta checkpoint (loaded on `device`: auto,
    cpu, cuda[:N], in `dtype`; an adapter checkpoint loads on `base_model`, default the base it names,
    merged with `merge`), or a loaded causal LM (then pass its `tokenizer`; it is scored where it is).
    Evaluation settings come as an `EvalConfig` or as its fields (`k=4, seeds=(100, 13),
    variants=("direct",), modes=("icl",), max_test_examples=10`). Per-option losses are cached under
    raymeta's home unless `cache=False`. `samples`, a list, receives one record per scored example.
    `adapt=AdaptConfig(steps, optimizer, lr)` adapts each target task's k examples first (explicit);
    `adapt="as-trained"` adapts a checkpoint with its own inner loop (`adaptation_as_trained`)."""
    if config is not None and options:
        raise UserError(f"pass either config or its fields ({', '.join(options)}), not both", key="config")
    if options.get("adapt") == "as-trained" or (config is not None and config.adapt == "as-trained"):
        if not isinstance(model, str):
            raise UserError("adapt='as-trained' reads the checkpoint's training state: pass the checkpoint's path", key="adapt")
        if merge:
            raise UserError(
                "adapt='as-trained' adapts the weights the checkpoint trained (its adapters); drop merge", key="adapt"
            )
        adapt = adaptation_as_trained(model, root=root)
        config, options = (replace(config, adapt=adapt), options) if config is not None else (None, {**options, "adapt": adapt})
    cfg = config or EvalConfig(**options)
    if isinstance(model, str):
        tokenizer = load_tokenizer(model, root)
        model = load_model(model, dtype=dtype, root=root, device=resolve_device(device), base_model=base_model, merge=merge)
    elif tokenizer is None:
        raise UserError("a loaded model needs its tokenizer (evaluate(model, tokenizer, ...))", key="tokenizer")
    source = data if isinstance(data, DataDir) else open_data(data, root)
    loss_cache = LossCache(paths(root).loss_cache) if cache else None
    results = evaluate_setting(
        model, tokenizer, source, source.setting(setting), cfg, cache=loss_cache, progress=progress, samples=samples
    )
    if loss_cache is not None:
        results["loss_cache"] = {"hits": loss_cache.hits, "misses": loss_cache.misses}
    return results


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: one line
        raise UserError(f"{path}: unreadable ({first_line(e)})", key="adapt") from None


def adaptation_as_trained(checkpoint: str | Path, *, steps: int | None = None, root: Path | None = None) -> AdaptConfig:
    """The inner loop a raymeta checkpoint was meta-trained with, as an `AdaptConfig` for `evaluate`:
    its inner optimizer and settings, `inner.steps` (or `steps`), and its outer state S under
    `moment_policy: init` or `shared`. A folder without a raymeta training state (a raw model), a metaicl
    checkpoint (no inner loop) or one without S is refused in one line."""
    spec = str(checkpoint)
    explicit = "; adapt it explicitly (--adapt-steps/--adapt-lr/--adapt-optimizer)"
    folder = resolve_model_dir(spec, root)
    ckpt = next((f for f in (folder, folder.parent) if (f / "state.json").is_file()), None)
    if ckpt is None:
        raise UserError(f"{spec}: not a raymeta checkpoint (no state.json with its training config){explicit}", key="adapt")
    try:
        state = json.loads((ckpt / "state.json").read_text())
        cfg = apply_overrides(TrainConfig(), state["config"], f"{ckpt / 'state.json'}").validate(str(ckpt / "state.json"))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{ckpt / 'state.json'}: unreadable training config ({e}){explicit}", key="adapt") from None
    meta = cfg.meta
    if meta.method == "metaicl":
        raise UserError(f"{spec}: meta-trained with method metaicl, which has no inner loop{explicit}", key="adapt")
    state_file = state_sha = None
    if meta.moment_policy != "none" and meta.inner_spec().has_moments:
        path = ckpt / "optimizer.safetensors"
        if not path.is_file() or not any(k.startswith("m.") for k in _tensor_names(path)):
            raise UserError(
                f"{spec}: moment_policy {meta.moment_policy} starts the inner loop from the outer state S, and this "
                f"checkpoint has none (optimizer.safetensors missing or empty){explicit}",
                key="adapt",
            )
        record = json.loads((ckpt / MANIFEST).read_text())["files"] if (ckpt / MANIFEST).is_file() else {}
        state_file = str(path.resolve())
        state_sha = record["optimizer.safetensors"][1] if "optimizer.safetensors" in record else sha256_file(path)
    return AdaptConfig.as_trained(
        meta,
        steps=steps,
        state_file=state_file,
        state_step=int(state.get("optimizer_step", 0)),
        state_sha256=state_sha,
        checkpoint=str(ckpt),
        trainable=cfg.weights.trainable,
    )
